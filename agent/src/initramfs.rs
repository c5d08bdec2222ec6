//! Whether the target's initramfs must be made again after configure, and
//! remaking it with the target's own tool.
//!
//! An initramfs made by the payload's kernel package knows nothing of the
//! fstab kiln writes. initramfs-tools takes from it only the file system
//! types of `/` and `/usr` (to carry their fsck), unless `FSTYPE` names them
//! in its config; dracut in host-only mode also records the root device. So
//! the initramfs is remade only when those inputs changed, which keeps a
//! minutes-long step under emulation off the path of a payload that pins
//! them (the Debian sample sets `FSTYPE=ext4`).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use kiln_spool::units::TimeLimit;

use crate::chroot::Target;
use crate::error::{Error, Result};
use crate::joblog::JobLog;
use crate::steps::{run_script, Place, Script};
use crate::tree::Tree;

/// The tool that makes the target's initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    InitramfsTools,
    Dracut,
}

impl Tool {
    fn command(self) -> &'static str {
        match self {
            Tool::InitramfsTools => "update-initramfs -u -k all",
            Tool::Dracut => "dracut --force --regenerate-all",
        }
    }
}

/// An fstab line as the initramfs sees it: source and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsLine {
    pub source: String,
    pub fstype: String,
}

/// What the target's initramfs was made from, read from the target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inputs {
    pub root: Option<FsLine>,
    pub usr: Option<FsLine>,
    /// initramfs-tools' `FSTYPE` when its config sets one other than `auto`.
    pub pinned_fstype: Option<String>,
}

impl Inputs {
    /// Reads fstab and initramfs-tools' config; what cannot be read counts
    /// as absent.
    pub fn read(tree: &Tree) -> Inputs {
        let read = |rel: &str| tree.read_optional(Path::new(rel)).ok().flatten();
        let fstab = read("etc/fstab").unwrap_or_default();
        let mut conf = read("etc/initramfs-tools/initramfs.conf").unwrap_or_default();
        if let Ok(dir) = tree.open_file(Path::new("etc/initramfs-tools/conf.d")) {
            let mut names: Vec<String> = read_dir_names(dir);
            names.sort();
            for n in names {
                conf.push('\n');
                conf.push_str(
                    &read(&format!("etc/initramfs-tools/conf.d/{n}")).unwrap_or_default(),
                );
            }
        }
        Inputs {
            root: fstab_entry(&fstab, "/"),
            usr: fstab_entry(&fstab, "/usr"),
            pinned_fstype: pinned_fstype(&conf),
        }
    }
}

fn read_dir_names(dir: std::fs::File) -> Vec<String> {
    use std::os::fd::AsRawFd;
    // Listing through the fd resolved beneath the target keeps the listing
    // there.
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    std::fs::read_dir(path)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The first fstab entry mounted at `dir`.
pub fn fstab_entry(fstab: &str, dir: &str) -> Option<FsLine> {
    fstab.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let source = f.next().filter(|s| !s.starts_with('#'))?;
        let mount = f.next()?;
        let fstype = f.next()?;
        (mount.trim_end_matches('/') == dir.trim_end_matches('/')).then(|| FsLine {
            source: source.into(),
            fstype: fstype.into(),
        })
    })
}

/// The last `FSTYPE=` of an initramfs-tools config, unless it is `auto`.
pub fn pinned_fstype(conf: &str) -> Option<String> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("FSTYPE="))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        .next_back()
        .filter(|v| !v.is_empty() && v != "auto")
}

/// Why the initramfs must be made again, or `None` when what it was made
/// from is unchanged.
pub fn refresh_reason(tool: Tool, before: &Inputs, after: &Inputs) -> Option<String> {
    match tool {
        Tool::InitramfsTools => {
            if after.pinned_fstype.is_some() {
                return None;
            }
            let ty = |l: &Option<FsLine>| l.as_ref().map(|l| l.fstype.clone());
            for (name, b, a) in [
                ("/", &before.root, &after.root),
                ("/usr", &before.usr, &after.usr),
            ] {
                if ty(b) != ty(a) {
                    return Some(format!(
                        "the file system type of {name} changed ({} -> {}) and initramfs-tools carries its fsck",
                        ty(b).unwrap_or_else(|| "none".into()),
                        ty(a).unwrap_or_else(|| "none".into())
                    ));
                }
            }
            None
        }
        Tool::Dracut => (before.root != after.root || before.usr != after.usr)
            .then(|| "the fstab entries of / or /usr changed and dracut records them".into()),
    }
}

/// The target's initramfs tool, if it has one and a kernel with an initramfs.
pub fn detect(tree: &Tree) -> Option<Tool> {
    let has = |rel: &str| tree.open_file(Path::new(rel)).is_ok();
    if has("usr/sbin/update-initramfs") {
        Some(Tool::InitramfsTools)
    } else if has("usr/bin/dracut") || has("usr/sbin/dracut") {
        Some(Tool::Dracut)
    } else {
        None
    }
}

/// Remakes the initramfs in the entered target when `before` (read before
/// configure) and the target as it is now differ in what it depends on.
pub fn refresh_if_needed(
    target: &mut Target,
    before: &Inputs,
    job_id: &str,
    log: &JobLog,
    abort: &AtomicBool,
) -> Result<()> {
    let tree = target.tree()?;
    let Some(tool) = detect(&tree) else {
        return Ok(());
    };
    let after = Inputs::read(&tree);
    let Some(reason) = refresh_reason(tool, before, &after) else {
        log.line("initramfs: what it was made from is unchanged; not remade");
        return Ok(());
    };
    log.line(&format!("initramfs: remade, because {reason}"));
    let c = target.enter(log)?;
    let env = c.env().to_vec();
    let script = Script {
        name: "initramfs",
        run: tool.command(),
        time_limit: TimeLimit::from_secs(30 * 60).unwrap_or(TimeLimit::MAX),
        job_id,
        env: &env,
    };
    let st = run_script(&script, &Place::Target(c), log, abort)?;
    if !st.success() {
        return Err(Error::Failed(format!(
            "{} in the target failed ({st})",
            tool.command()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(fstab: &str, conf: &str) -> Inputs {
        Inputs {
            root: fstab_entry(fstab, "/"),
            usr: fstab_entry(fstab, "/usr"),
            pinned_fstype: pinned_fstype(conf),
        }
    }

    #[test]
    fn fstab_entries_are_found_by_mount_point() {
        let fstab =
            "# c\nUUID=a / ext4 errors=remount-ro 0 1\nUUID=b /boot/efi vfat umask=0077 0 2\n";
        assert_eq!(
            fstab_entry(fstab, "/"),
            Some(FsLine {
                source: "UUID=a".into(),
                fstype: "ext4".into()
            })
        );
        assert_eq!(fstab_entry(fstab, "/usr"), None);
        assert_eq!(fstab_entry("#UUID=a / ext4\n", "/"), None);
    }

    #[test]
    fn a_pinned_fstype_keeps_initramfs_tools_off_the_path() {
        let before = inputs("", "FSTYPE=ext4\n");
        let after = inputs("UUID=a / ext4 defaults 0 1\n", "FSTYPE=ext4\n");
        assert_eq!(refresh_reason(Tool::InitramfsTools, &before, &after), None);
        assert_eq!(pinned_fstype("FSTYPE=auto\n"), None);
        assert_eq!(
            pinned_fstype("FSTYPE=x\nFSTYPE=\"ext4\"\n").as_deref(),
            Some("ext4")
        );
    }

    #[test]
    fn a_new_root_type_remakes_the_initramfs() {
        let before = inputs("", "");
        let after = inputs("UUID=a / ext4 defaults 0 1\n", "");
        let why = refresh_reason(Tool::InitramfsTools, &before, &after).unwrap();
        assert!(why.contains("none -> ext4"), "{why}");
        // Same types, other UUIDs: initramfs-tools does not care, dracut does.
        let before = inputs("UUID=old / ext4 defaults 0 1\n", "");
        assert_eq!(refresh_reason(Tool::InitramfsTools, &before, &after), None);
        assert!(refresh_reason(Tool::Dracut, &before, &after).is_some());
        assert_eq!(refresh_reason(Tool::Dracut, &after, &after), None);
    }
}
