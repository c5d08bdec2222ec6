//! The layout plan: where each partition of the job starts and ends on a
//! disk of a given size. Pure arithmetic, tested without a disk.

use kiln_spool::job::{Disk, FsKind, PartKind, Table};
use kiln_spool::units::{human_bytes, Size};

pub const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPartition {
    /// 1-based partition number, as in `/dev/sda1`.
    pub number: u32,
    pub label: String,
    pub kind: PartKind,
    pub fs: FsKind,
    pub mount: Option<String>,
    /// Byte offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    pub table: Table,
    pub disk_size: u64,
    pub sector_size: u64,
    pub partitions: Vec<PlannedPartition>,
}

/// Lays the job's partitions out on a disk of `disk_size` bytes, each one
/// starting on a 1 MiB boundary, `rest` taking what is left (in whole MiB)
/// before the backup GPT. The error says how much room is missing.
pub fn plan(disk: &Disk, disk_size: u64, sector_size: u64) -> Result<DiskPlan, String> {
    // GPT keeps a backup header and a 128-entry array at the end of the disk.
    let tail = match disk.table {
        Table::Gpt => 128 * 128 + sector_size,
        Table::Mbr => 0,
    };
    let usable_end = disk_size.saturating_sub(tail);
    let mut next = MIB;
    let mut parts = Vec::new();
    let mut needed = MIB + tail;
    for p in &disk.partitions {
        needed += match p.size {
            Size::Bytes(n) => n,
            Size::Rest => MIB,
        };
    }
    if needed > disk_size {
        return Err(format!(
            "the disk holds {} ({disk_size} bytes) but the layout needs at least {} ({needed} bytes)",
            human_bytes(disk_size),
            human_bytes(needed)
        ));
    }
    for (i, p) in disk.partitions.iter().enumerate() {
        let start = next.div_ceil(MIB) * MIB;
        let size = match p.size {
            Size::Bytes(n) => n,
            Size::Rest => (usable_end / MIB * MIB).saturating_sub(start),
        };
        if size == 0 || start + size > usable_end {
            return Err(format!(
                "partition {:?} does not fit on a disk of {}",
                p.label,
                human_bytes(disk_size)
            ));
        }
        parts.push(PlannedPartition {
            number: i as u32 + 1,
            label: p.label.clone(),
            kind: p.kind,
            fs: p.fs,
            mount: p.mount.clone(),
            start,
            size,
        });
        next = start + size;
    }
    if disk.table == Table::Mbr {
        let max = u32::MAX as u64 * sector_size;
        if next > max {
            return Err(format!(
                "an MBR table cannot address past {}; use table = \"gpt\"",
                human_bytes(max)
            ));
        }
    }
    Ok(DiskPlan {
        table: disk.table,
        disk_size,
        sector_size,
        partitions: parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::job::Partition;

    fn part(label: &str, size: Size, kind: PartKind, fs: FsKind) -> Partition {
        Partition {
            label: label.into(),
            size,
            kind,
            fs,
            mount: None,
        }
    }

    fn disk(table: Table, parts: Vec<Partition>) -> Disk {
        Disk {
            device: "auto".into(),
            table,
            partitions: parts,
        }
    }

    #[test]
    fn partitions_are_mib_aligned_and_rest_fills_the_disk() {
        let d = disk(
            Table::Gpt,
            vec![
                part("esp", Size::Bytes(32 * MIB), PartKind::Esp, FsKind::Vfat),
                part("root", Size::Rest, PartKind::Linux, FsKind::Ext4),
            ],
        );
        let p = plan(&d, 256 * MIB, 512).unwrap();
        assert_eq!(p.partitions[0].start, MIB);
        assert_eq!(p.partitions[0].size, 32 * MIB);
        assert_eq!(p.partitions[1].start, 33 * MIB);
        // The last MiB holds the backup GPT, so rest ends one MiB early.
        assert_eq!(p.partitions[1].start + p.partitions[1].size, 255 * MIB);
    }

    #[test]
    fn a_small_disk_is_refused_with_the_sizes() {
        let d = disk(
            Table::Mbr,
            vec![part(
                "root",
                Size::Bytes(100 * MIB),
                PartKind::Linux,
                FsKind::Ext4,
            )],
        );
        let e = plan(&d, 64 * MIB, 512).unwrap_err();
        assert!(e.contains("64.0 MiB") && e.contains("101.0 MiB"), "{e}");
        let p = plan(&d, 101 * MIB, 512).unwrap();
        assert_eq!(p.partitions[0].start + p.partitions[0].size, 101 * MIB);
    }
}
