//! Grow: on a disk larger than the image, the GPT's backup header and
//! array move to the disk's end, the last partition grows to fill the disk
//! (its end on a 1 MiB boundary), and an ext2/3/4 filesystem in it is
//! checked (`e2fsck -f -y`) and grown (`resize2fs`). An MBR table is left
//! as it is.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpt::disk::LogicalBlockSize;
use gpt::mbr::{PartRecord, ProtectiveMBR};
use kiln_spool::job::{FsKind, PartKind, Table};

use crate::disk::loopdev::LoopDevice;
use crate::disk::plan::{DiskPlan, PlannedPartition};
use crate::disk::{partition, sector_size, size_of};
use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;

/// Partition ends are kept on this boundary.
const ALIGN: u64 = 1 << 20;
const EXT_MAGIC: u16 = 0xef53;

/// What the grow did, for the caller's messages and summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grown {
    /// The last partition now ends at byte `end`; `fs` says what happened
    /// to its filesystem.
    Partition { number: u32, end: u64, fs: String },
    /// Nothing was grown, and why.
    Nothing(String),
}

/// Grows the last GPT partition of `disk` and its filesystem to the disk's end.
pub(super) fn grow(disk: &Path, image_disk_size: u64) -> Result<Grown> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .ctx(|| format!("opening {} to grow its last partition", disk.display()))?;
    let size = size_of(&file, disk)?;
    if size <= image_disk_size {
        return Ok(Grown::Nothing(format!(
            "{} is no larger than the image's disk",
            disk.display()
        )));
    }
    let ss = sector_size(&file);
    let lb = match ss {
        512 => LogicalBlockSize::Lb512,
        4096 => LogicalBlockSize::Lb4096,
        other => {
            return Ok(Grown::Nothing(format!(
                "{} has {other}-byte sectors; only 512 and 4096 are grown",
                disk.display()
            )))
        }
    };
    let gpt_err = |what: &str, e: gpt::GptError| {
        Error::Failed(format!("{what} the GPT of {}: {e}", disk.display()))
    };
    let (plan, last_number, last_start, old_backup) = {
        let mut gdisk = match gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(lb)
            .open_from_device(&mut file)
        {
            Ok(g) => g,
            Err(_) => {
                let mut sig = [0u8; 2];
                let mbr = file.read_exact_at(&mut sig, 510).is_ok() && sig == [0x55, 0xaa];
                return Ok(Grown::Nothing(if mbr {
                    "the image has an MBR partition table: nothing is grown".into()
                } else {
                    "the image has no partition table: nothing is grown".into()
                }));
            }
        };
        let header = gdisk.header().clone();
        let mut parts: BTreeMap<u32, gpt::partition::Partition> = gdisk
            .partitions()
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        let Some((&last_key, last)) = parts.iter().max_by_key(|(_, p)| p.last_lba) else {
            return Ok(Grown::Nothing(
                "the GPT has no partitions: nothing is grown".into(),
            ));
        };
        let sectors = size / ss;
        let array_sectors = (header.num_parts as u64 * header.part_size as u64).div_ceil(ss);
        let last_usable = sectors - 2 - array_sectors;
        // Where the image's backup header and array were: at the end of the image's disk.
        let old_backup = (header.backup_lba > array_sectors)
            .then(|| (header.backup_lba - array_sectors, header.backup_lba));
        let align = ALIGN / ss;
        let new_last = (last_usable + 1) / align * align - 1;
        if new_last <= last.last_lba {
            return Ok(Grown::Nothing(format!(
                "partition {last_key} already ends within a MiB of the disk's end"
            )));
        }
        let last_start = last.first_lba * ss;
        if let Some(p) = parts.get_mut(&last_key) {
            p.last_lba = new_last;
        }
        gdisk
            .update_partitions(parts.clone())
            .map_err(|e| gpt_err("updating", e))?;
        gdisk.write_inplace().map_err(|e| gpt_err("writing", e))?;
        // The table is written with its used entries first, so partition
        // numbers follow key order.
        let partitions: Vec<PlannedPartition> = parts
            .values()
            .enumerate()
            .map(|(i, p)| PlannedPartition {
                number: i as u32 + 1,
                label: p.name.clone(),
                kind: PartKind::Linux,
                fs: FsKind::None,
                mount: None,
                start: p.first_lba * ss,
                size: (p.last_lba + 1 - p.first_lba) * ss,
            })
            .collect();
        let last_number = parts.keys().position(|k| *k == last_key).unwrap_or(0) as u32 + 1;
        (
            DiskPlan {
                table: Table::Gpt,
                disk_size: size,
                sector_size: ss,
                partitions,
            },
            last_number,
            last_start,
            old_backup,
        )
    };
    // The protective MBR covers the whole disk again; its boot code stays.
    if let Ok(mut pmbr) = ProtectiveMBR::from_disk(&mut file, lb) {
        if pmbr.partition(0).is_some_and(|p| p.os_type == 0xee) {
            let lbs = u32::try_from(size / ss - 1).unwrap_or(u32::MAX);
            pmbr.set_partition(0, PartRecord::new_protective(Some(lbs)));
            pmbr.update_conservative(&mut file).map_err(|e| {
                Error::Failed(format!(
                    "updating the protective MBR of {}: {e}",
                    disk.display()
                ))
            })?;
        }
    }
    // The old backup header and array, now inside the grown partition past
    // its filesystem's end, must not be found by a tool looking for a GPT.
    if let Some((part_start, header_lba)) = old_backup {
        if (header_lba + 1) * ss <= image_disk_size {
            let len = ((header_lba + 1 - part_start) * ss) as usize;
            file.write_all_at(&vec![0u8; len], part_start * ss)
                .ctx(|| format!("zeroing the old backup GPT of {}", disk.display()))?;
        }
    }
    file.sync_all()
        .ctx(|| format!("flushing the grown GPT of {}", disk.display()))?;
    let end = plan
        .partitions
        .iter()
        .find(|p| p.number == last_number)
        .map_or(0, |p| p.start + p.size);
    if !is_ext(&file, last_start) {
        return Ok(Grown::Partition {
            number: last_number,
            end,
            fs: "it holds no ext2/3/4 filesystem, so no filesystem was grown".into(),
        });
    }
    drop(file);
    let fs = with_partition_node(disk, &plan, last_number, |node| {
        e2fsck(node)?;
        resize2fs(node)
    })?;
    Ok(Grown::Partition {
        number: last_number,
        end,
        fs,
    })
}

fn is_ext(file: &File, part_start: u64) -> bool {
    let mut magic = [0u8; 2];
    file.read_exact_at(&mut magic, part_start + 1024 + 0x38)
        .is_ok()
        && u16::from_le_bytes(magic) == EXT_MAGIC
}

/// Runs `f` on the node of partition `number`: on a block device after the
/// kernel re-read the table, on a file through a loop device with
/// partition scanning.
fn with_partition_node<T>(
    disk: &Path,
    plan: &DiskPlan,
    number: u32,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::metadata(disk)
        .ctx(|| format!("reading {}", disk.display()))?
        .file_type()
        .is_block_device();
    let log = JobLog::discard();
    let node = |nodes: Vec<PathBuf>| -> Result<PathBuf> {
        plan.partitions
            .iter()
            .position(|p| p.number == number)
            .and_then(|i| nodes.get(i).cloned())
            .ok_or_else(|| Error::Failed(format!("partition {number} has no device node")))
    };
    if block {
        let nodes = partition::expose_partitions(disk, plan, &log)?;
        f(&node(nodes)?)
    } else {
        let dev = LoopDevice::attach(disk)?;
        let nodes = partition::expose_partitions(dev.path(), plan, &log)?;
        let r = f(&node(nodes)?);
        dev.detach()?;
        r
    }
}

/// `e2fsck -f -y`: 0 (clean) and 1 (errors fixed) let the grow go on.
fn e2fsck(node: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(node)
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running e2fsck -f -y {}", node.display()))?;
    match out.status.code() {
        Some(0) | Some(1) => Ok(()),
        _ => Err(Error::Failed(format!(
            "e2fsck -f -y {} failed ({}): {}",
            node.display(),
            out.status,
            tail(&out.stdout, &out.stderr)
        ))),
    }
}

fn resize2fs(node: &Path) -> Result<String> {
    let out = Command::new("resize2fs")
        .arg(node)
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running resize2fs {}", node.display()))?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "resize2fs {} failed ({}): {}",
            node.display(),
            out.status,
            tail(&out.stdout, &out.stderr)
        )));
    }
    Ok(format!(
        "its filesystem was checked and grown ({})",
        node.display()
    ))
}

fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}
