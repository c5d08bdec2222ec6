//! Which disk the agent builds on: `disk = "auto"` takes the first whole disk
//! in `/sys/block` that is not removable, not a loop, RAM, optical or
//! device-mapper device, and has a size.

use std::path::{Path, PathBuf};

/// Name prefixes of block devices that are never a build target.
const NOT_DISKS: &[&str] = &["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"];

/// The first candidate disk's name in a sysfs `block` directory.
pub fn auto_disk(sys_block: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|name| is_candidate(sys_block, name))
}

fn is_candidate(sys_block: &Path, name: &str) -> bool {
    if NOT_DISKS.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    let read = |f: &str| {
        std::fs::read_to_string(sys_block.join(name).join(f)).map(|s| s.trim().to_string())
    };
    if read("removable").is_ok_and(|r| r == "1") {
        return false;
    }
    matches!(read("size").map(|s| s.parse::<u64>()), Ok(Ok(n)) if n > 0)
}

/// The device path for the configured `disk`: an explicit path as given,
/// "auto" resolved against `sys_block`. None while no disk qualifies.
pub fn choose(configured: &str, sys_block: &Path) -> Option<PathBuf> {
    if configured == "auto" || configured.is_empty() {
        auto_disk(sys_block).map(|n| Path::new("/dev").join(n))
    } else {
        let p = PathBuf::from(configured);
        p.exists().then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(root: &Path, name: &str, size: u64, removable: bool) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        std::fs::write(d.join("removable"), if removable { "1\n" } else { "0\n" }).unwrap();
    }

    #[test]
    fn auto_takes_the_first_fixed_disk_with_a_size() {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path();
        dev(b, "loop0", 1000, false);
        dev(b, "ram0", 1000, false);
        dev(b, "sr0", 1000, true);
        dev(b, "sda", 1000, true); // a USB stick
        dev(b, "vdb", 2000, false);
        dev(b, "vda", 0, false); // no medium
        assert_eq!(auto_disk(b).as_deref(), Some("vdb"));
        dev(b, "nvme0n1", 5000, false);
        assert_eq!(auto_disk(b).as_deref(), Some("nvme0n1"));
        assert_eq!(choose("auto", b), Some(PathBuf::from("/dev/nvme0n1")));
    }

    #[test]
    fn nothing_qualifies_and_explicit_paths() {
        let tmp = tempfile::tempdir().unwrap();
        dev(tmp.path(), "loop0", 1000, false);
        assert_eq!(auto_disk(tmp.path()), None);
        assert_eq!(auto_disk(&tmp.path().join("missing")), None);
        let f = tmp.path().join("disk.img");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(choose(f.to_str().unwrap(), tmp.path()), Some(f));
        assert_eq!(choose("/dev/nonexistent-kiln", tmp.path()), None);
    }
}
