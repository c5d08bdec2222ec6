//! The pseudo filesystems PID 1 mounts, from one fixed table.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};

/// One entry of the mount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PseudoMount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Everything the agent and its tools need, in mount order (devpts lives
/// under /dev, so devtmpfs comes first).
pub const MOUNTS: &[PseudoMount] = &[
    PseudoMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    PseudoMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    PseudoMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    PseudoMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    PseudoMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    // The agent's scratch space: payload cache, image, job log.
    PseudoMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
];

/// Whether `target` is already a mount point according to `/proc/self/mounts` text.
pub fn is_mounted(mounts: &str, target: &str) -> bool {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|t| t == target)
}

/// Mounts every entry of [`MOUNTS`] under `root` that is not mounted yet
/// (the kernel may have mounted devtmpfs itself).
pub fn mount_all(root: &Path) -> Result<()> {
    for m in MOUNTS {
        let target = root.join(m.target.trim_start_matches('/'));
        let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if is_mounted(&mounted, &target.to_string_lossy()) {
            continue;
        }
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        let data = (!m.data.is_empty()).then_some(m.data);
        mount(Some(m.source), &target, Some(m.fstype), m.flags, data)
            .with_context(|| format!("mounting {} on {}", m.fstype, target.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_mounts_dev_before_dev_pts_and_has_each_target_once() {
        let targets: Vec<&str> = MOUNTS.iter().map(|m| m.target).collect();
        for t in ["/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp"] {
            assert_eq!(targets.iter().filter(|x| **x == t).count(), 1, "{t}");
        }
        let pos = |t: &str| targets.iter().position(|x| *x == t).unwrap();
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(MOUNTS.iter().all(|m| m.target.starts_with('/')));
    }

    #[test]
    fn mounted_targets_come_from_the_second_field() {
        let text = "devtmpfs /dev devtmpfs rw 0 0\nproc /proc proc rw 0 0\n";
        assert!(is_mounted(text, "/dev"));
        assert!(is_mounted(text, "/proc"));
        assert!(!is_mounted(text, "/dev/pts"));
        assert!(!is_mounted(text, "devtmpfs"));
    }
}
