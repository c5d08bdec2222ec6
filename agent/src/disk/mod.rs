//! The disk: its size and partition nodes, the layout plan, the partition
//! table, filesystems, mounts and loop devices for disk image files.

pub mod loopdev;
pub mod mkfs;
pub mod mount;
pub mod partition;
pub mod plan;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Size in bytes of a block device or a regular file.
pub fn size_of(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .ctx(|| format!("reading metadata of {}", path.display()))?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(|| format!("reading the size of {}", path.display()));
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// Logical sector size: the device's for a block device, 512 for a file.
pub fn sector_size(file: &File) -> u64 {
    let mut ss: libc::c_int = 0;
    let is_block = file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_block {
        return 512;
    }
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET as _, &mut ss) };
    if r == 0 && ss > 0 {
        ss as u64
    } else {
        512
    }
}

/// The device node of partition `n` of `disk`: `/dev/sda1`, `/dev/nvme0n1p1`, `/dev/loop0p1`.
pub fn partition_node(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

/// Refuses a disk that is mounted, or that has a mounted partition or is
/// active swap, using the device numbers in /proc/self/mountinfo and /proc/swaps.
pub fn check_not_in_use(disk: &Path) -> Result<()> {
    let meta = std::fs::metadata(disk).ctx(|| format!("reading {}", disk.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "reading /proc/self/mountinfo".to_string())?;
    for line in mountinfo.lines() {
        let mut f = line.split(' ');
        let dev = f.nth(2).unwrap_or("");
        let mount_point = f.nth(1).unwrap_or("");
        let Some((ma, mi)) = dev.split_once(':') else {
            continue;
        };
        let (ma, mi): (u32, u32) = (ma.parse().unwrap_or(0), mi.parse().unwrap_or(0));
        let same_disk = ma == major && mi == minor;
        let child = same_disk || is_partition_of(ma, mi, &name);
        if child {
            return Err(Error::Input(format!(
                "{} is in use: mounted on {mount_point}",
                disk.display()
            )));
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let dev = line.split_whitespace().next().unwrap_or("");
            if dev.starts_with(&*disk.to_string_lossy()) {
                return Err(Error::Input(format!(
                    "{} is in use: {dev} is active swap",
                    disk.display()
                )));
            }
        }
    }
    Ok(())
}

fn is_partition_of(major: u32, minor: u32, disk_name: &str) -> bool {
    let link = format!("/sys/dev/block/{major}:{minor}");
    let Ok(target) = std::fs::read_link(&link) else {
        return false;
    };
    // A partition's sysfs path is .../block/<disk>/<partition>.
    target
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n.to_string_lossy() == disk_name)
}

/// Flushes the device's dirty pages to the disk.
pub fn sync_device(file: &File, path: &Path) -> Result<()> {
    file.sync_all()
        .ctx(|| format!("flushing {}", path.display()))
}
