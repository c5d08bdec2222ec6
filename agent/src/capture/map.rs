//! The disk map: which byte regions capture reads and which it skips
//! because a filesystem marks them free. Built from the partition table
//! (GPT or MBR; a disk without one is probed as a whole) and each
//! partition's filesystem: ext4, FAT or swap. Everything else is read.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{ext4, fat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Read; all-zero blocks are still dropped from the data map.
    Read,
    /// Free in its filesystem: not read, captured as zeros.
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
}

/// The disk map and the bytes read to make it.
pub struct DiskMap {
    pub regions: Vec<Region>,
    pub bytes_read: u64,
    /// One line per partition: where it is and how it was read.
    pub notes: Vec<String>,
}

/// Partitions as (start, length) in bytes, from GPT, else MBR, else none.
fn partitions(disk: &File, size: u64, sector: u64) -> Vec<(u64, u64)> {
    let lb = if sector == 4096 {
        gpt::disk::LogicalBlockSize::Lb4096
    } else {
        gpt::disk::LogicalBlockSize::Lb512
    };
    if let Ok(f) = disk.try_clone() {
        if let Ok(g) = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(f)
        {
            let mut v: Vec<(u64, u64)> = g
                .partitions()
                .values()
                .filter(|p| p.is_used())
                .map(|p| {
                    (
                        p.first_lba * sector,
                        (p.last_lba + 1 - p.first_lba) * sector,
                    )
                })
                .filter(|(s, l)| s + l <= size)
                .collect();
            v.sort_unstable();
            return v;
        }
    }
    if let Ok(mut f) = disk.try_clone() {
        if let Ok(m) = mbrman::MBR::read_from(&mut f, sector as u32) {
            let mut v: Vec<(u64, u64)> = m
                .iter()
                .filter(|(_, p)| p.is_used() && !p.is_extended() && p.sys != 0xee)
                .map(|(_, p)| (p.starting_lba as u64 * sector, p.sectors as u64 * sector))
                .filter(|(s, l)| s + l <= size)
                .collect();
            v.sort_unstable();
            return v;
        }
    }
    vec![]
}

/// Maps the disk. Free regions come only from filesystems this reader
/// understands; everything else is `Read`.
pub fn map_disk(disk: &File, size: u64, sector: u64) -> std::io::Result<DiskMap> {
    let mut bytes_read = 0u64;
    let mut read = |off: u64, n: usize| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        disk.read_exact_at(&mut buf, off)?;
        bytes_read += n as u64;
        Ok(buf)
    };
    let mut parts = partitions(disk, size, sector);
    let whole = parts.is_empty();
    if whole {
        parts.push((0, size));
    }
    let mut regions = Vec::new();
    let mut notes = Vec::new();
    let mut pos = 0u64;
    for (start, len) in parts {
        if start < pos {
            continue;
        }
        if start > pos {
            regions.push(Region {
                start: pos,
                len: start - pos,
                kind: RegionKind::Read,
            });
        }
        let (how, r) = probe(start, len, &mut read)?;
        notes.push(format!("{how} at {start}+{len}"));
        regions.extend(r);
        pos = start + len;
    }
    if pos < size {
        regions.push(Region {
            start: pos,
            len: size - pos,
            kind: RegionKind::Read,
        });
    }
    Ok(DiskMap {
        regions,
        bytes_read,
        notes,
    })
}

fn probe(
    start: u64,
    len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<(&'static str, Vec<Region>)> {
    if len >= 4096 {
        if let Some(r) = ext4::regions(start, len, read)? {
            return Ok(("ext4", r));
        }
        if let Some(r) = fat::regions(start, len, read)? {
            return Ok(("fat", r));
        }
        // A swap area's content is worthless once captured: keep its header page.
        let page = read(start, 4096)?;
        if &page[4086..4096] == b"SWAPSPACE2" {
            return Ok((
                "swap",
                vec![
                    Region {
                        start,
                        len: 4096,
                        kind: RegionKind::Read,
                    },
                    Region {
                        start: start + 4096,
                        len: len - 4096,
                        kind: RegionKind::Free,
                    },
                ],
            ));
        }
    }
    Ok((
        "raw",
        vec![Region {
            start,
            len,
            kind: RegionKind::Read,
        }],
    ))
}
