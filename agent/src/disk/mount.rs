//! Mounts as guard types: each unmounts on drop, retrying briefly, logging
//! and never panicking.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Context, Result};

/// One mount; unmounted on drop.
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `source` (a device, or `proc`/`sysfs`) of type `fstype` on `target`.
    pub fn new(source: &Path, target: &Path, fstype: &str) -> Result<Mount> {
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .ctx(|| {
            format!(
                "mounting {} ({fstype}) on {}",
                source.display(),
                target.display()
            )
        })?;
        Ok(Mount {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    /// Bind-mounts `source` on `target`.
    pub fn bind(source: &Path, target: &Path) -> Result<Mount> {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("binding {} on {}", source.display(), target.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now and reports failure (drop only logs it).
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let mut last = Ok(());
        for _ in 0..25 {
            last = umount2(&self.target, MntFlags::empty());
            match last {
                Ok(()) => {
                    self.mounted = false;
                    return Ok(());
                }
                Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(40)),
                Err(_) => break,
            }
        }
        self.mounted = false;
        last.ctx(|| format!("unmounting {}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!("kiln-agent: {}", e.one_line());
            // Leave nothing mounted behind: a lazy unmount detaches it now.
            let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}
