//! Writes the partition table (GPT with the `gpt` crate, MBR with `mbrman`),
//! makes the kernel show the partitions, and wipes the table after a failure.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpt::disk::LogicalBlockSize;
use gpt::partition_types;
use kiln_spool::job::{PartKind, Table};

use super::plan::DiskPlan;
use super::{partition_node, size_of};
use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;

const BLKRRPART: libc::c_ulong = 0x125f;
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_ADD_PARTITION: libc::c_int = 1;
const BLKPG_DEL_PARTITION: libc::c_int = 2;

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// GPT type of a partition kind.
pub fn gpt_type(kind: PartKind) -> partition_types::Type {
    match kind {
        PartKind::Esp => partition_types::EFI,
        PartKind::Linux => partition_types::LINUX_FS,
        PartKind::Swap => partition_types::LINUX_SWAP,
        PartKind::BiosBoot => partition_types::BIOS,
    }
}

/// MBR system id of a partition kind.
pub fn mbr_type(kind: PartKind) -> u8 {
    match kind {
        PartKind::Esp => 0xef,
        PartKind::Linux => 0x83,
        PartKind::Swap => 0x82,
        PartKind::BiosBoot => 0x83,
    }
}

/// Writes the plan's table to the disk and flushes it.
pub fn write_table(disk: &Path, plan: &DiskPlan) -> Result<()> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .ctx(|| format!("opening {} to partition it", disk.display()))?;
    // Stale signatures of an older table must not survive next to the new one.
    zero_table_areas(&mut file, disk, plan.sector_size)?;
    match plan.table {
        Table::Gpt => write_gpt(&mut file, disk, plan)?,
        Table::Mbr => write_mbr(&mut file, disk, plan)?,
    }
    file.sync_all()
        .ctx(|| format!("flushing the partition table of {}", disk.display()))
}

fn write_gpt(file: &mut File, disk: &Path, plan: &DiskPlan) -> Result<()> {
    let ss = plan.sector_size;
    let lb = if ss == 4096 {
        LogicalBlockSize::Lb4096
    } else {
        LogicalBlockSize::Lb512
    };
    let gpt_err =
        |e: gpt::GptError| Error::Failed(format!("writing the GPT of {}: {e}", disk.display()));
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(plan.disk_size / ss - 1).unwrap_or(0xffff_ffff),
    );
    mbr.overwrite_lba0(file).map_err(|e| {
        Error::Failed(format!(
            "writing the protective MBR of {}: {e}",
            disk.display()
        ))
    })?;
    let mut gdisk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(&mut *file, None)
        .map_err(gpt_err)?;
    let mut parts = BTreeMap::new();
    for p in &plan.partitions {
        parts.insert(
            p.number,
            gpt::partition::Partition {
                part_type_guid: gpt_type(p.kind),
                part_guid: uuid::Uuid::new_v4(),
                first_lba: p.start / ss,
                last_lba: (p.start + p.size) / ss - 1,
                flags: 0,
                name: p.label.clone(),
            },
        );
    }
    gdisk.update_partitions(parts).map_err(gpt_err)?;
    gdisk.write_inplace().map_err(gpt_err)?;
    Ok(())
}

fn write_mbr(file: &mut File, disk: &Path, plan: &DiskPlan) -> Result<()> {
    let ss = plan.sector_size;
    let sig: [u8; 4] = *uuid::Uuid::new_v4()
        .as_bytes()
        .first_chunk()
        .unwrap_or(&[1, 2, 3, 4]);
    let mbr_err =
        |e: mbrman::Error| Error::Failed(format!("writing the MBR of {}: {e}", disk.display()));
    let mut mbr = mbrman::MBR::new_from(file, ss as u32, sig).map_err(mbr_err)?;
    for p in &plan.partitions {
        mbr[p.number as usize] = mbrman::MBRPartitionEntry {
            boot: if p.kind == PartKind::Esp {
                mbrman::BOOT_ACTIVE
            } else {
                mbrman::BOOT_INACTIVE
            },
            first_chs: mbrman::CHS::empty(),
            sys: mbr_type(p.kind),
            last_chs: mbrman::CHS::empty(),
            starting_lba: (p.start / ss) as u32,
            sectors: (p.size / ss) as u32,
        };
    }
    mbr.write_into(file).map_err(mbr_err)
}

/// Zeroes where partition tables live: the MBR and primary GPT (the first
/// 34 sectors) and the backup GPT (the last 33).
fn zero_table_areas(file: &mut File, disk: &Path, sector_size: u64) -> Result<()> {
    let size = size_of(file, disk)?;
    let head = (34 * sector_size).min(size);
    let tail_len = (128 * 128 + sector_size).min(size);
    let zeros = vec![0u8; head.max(tail_len) as usize];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&zeros[..head as usize]))
        .and_then(|_| file.seek(SeekFrom::Start(size - tail_len)))
        .and_then(|_| file.write_all(&zeros[..tail_len as usize]))
        .ctx(|| format!("zeroing the partition table areas of {}", disk.display()))
}

/// Wipes the partition table (protective MBR, both GPT headers and arrays)
/// and drops the kernel's partitions. Used after a failure: the disk must
/// not look like a finished system.
pub fn wipe_table(disk: &Path) -> Result<()> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .ctx(|| format!("opening {} to wipe its partition table", disk.display()))?;
    let ss = super::sector_size(&file);
    zero_table_areas(&mut file, disk, ss)?;
    file.sync_all().ctx(|| {
        format!(
            "flushing {} after wiping its partition table",
            disk.display()
        )
    })?;
    if is_block_device(&file) {
        drop_partitions(&file, disk);
        // SAFETY: BLKRRPART takes no argument.
        unsafe { libc::ioctl(file.as_raw_fd(), BLKRRPART as _, 0) };
    }
    Ok(())
}

fn is_block_device(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Numbers of the partitions the kernel currently shows for `disk`.
fn kernel_partitions(disk: &Path) -> Vec<u32> {
    let name = disk
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let Ok(dir) = std::fs::read_dir(format!("/sys/class/block/{name}")) else {
        return vec![];
    };
    let mut out = vec![];
    for e in dir.flatten() {
        if let Ok(n) = std::fs::read_to_string(e.path().join("partition")) {
            if let Ok(n) = n.trim().parse() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Removes the kernel's partitions of `disk` (BLKPG), ignoring failures:
/// a partition that is gone already is what we want.
pub fn drop_partitions(file: &File, disk: &Path) {
    for n in kernel_partitions(disk) {
        let _ = blkpg(file, BLKPG_DEL_PARTITION, n, 0, 0);
    }
}

fn blkpg(file: &File, op: libc::c_int, pno: u32, start: u64, length: u64) -> std::io::Result<()> {
    let mut part = BlkpgPartition {
        start: start as libc::c_longlong,
        length: length as libc::c_longlong,
        pno: pno as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: &mut part as *mut BlkpgPartition as *mut libc::c_void,
    };
    // SAFETY: BLKPG reads the argument struct and the partition it points to,
    // both alive for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKPG as _, &mut arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes the kernel show the plan's partitions and waits for their nodes.
/// The table re-read (BLKRRPART) is tried first; where it makes no nodes
/// (loop devices on some kernels) each partition is added with BLKPG.
/// Returns the node of every partition, in plan order.
pub fn expose_partitions(disk: &Path, plan: &DiskPlan, log: &JobLog) -> Result<Vec<PathBuf>> {
    let file = File::open(disk).ctx(|| format!("opening {}", disk.display()))?;
    let nodes: Vec<PathBuf> = plan
        .partitions
        .iter()
        .map(|p| partition_node(disk, p.number))
        .collect();
    if !is_block_device(&file) {
        return Err(Error::Failed(format!(
            "{} is not a block device; attach it to a loop device first",
            disk.display()
        )));
    }
    drop_partitions(&file, disk);
    // SAFETY: BLKRRPART takes no argument.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKRRPART as _, 0) };
    if r != 0 {
        log.line(&format!(
            "re-reading the partition table of {}: {}",
            disk.display(),
            std::io::Error::last_os_error()
        ));
    }
    let expected: Vec<u32> = plan.partitions.iter().map(|p| p.number).collect();
    if !wait_until(Duration::from_millis(300), || {
        kernel_partitions(disk) == expected
    }) {
        log.line("the table re-read made no partitions; adding them with BLKPG");
        drop_partitions(&file, disk);
        for p in &plan.partitions {
            blkpg(&file, BLKPG_ADD_PARTITION, p.number, p.start, p.size).ctx(|| {
                format!(
                    "adding partition {} of {} (BLKPG)",
                    p.number,
                    disk.display()
                )
            })?;
        }
    }
    let ok = wait_until(Duration::from_secs(10), || {
        nodes.iter().all(|n| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(n).is_ok_and(|m| m.file_type().is_block_device())
        })
    });
    if !ok {
        let missing: Vec<String> = nodes
            .iter()
            .filter(|n| !n.exists())
            .map(|n| n.display().to_string())
            .collect();
        return Err(Error::Failed(format!(
            "partition nodes did not appear within 10s: {}",
            missing.join(", ")
        )));
    }
    Ok(nodes)
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
