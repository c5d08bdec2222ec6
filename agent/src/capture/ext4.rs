//! Which blocks of an ext4 filesystem are in use, from its superblock,
//! group descriptors and block bitmaps. Groups whose bitmap was never
//! initialised (BLOCK_UNINIT) are computed as the kernel does; inode table
//! blocks past the last inode ever used in a group count as free.
//! Anything this reader does not understand returns `None` and the caller
//! reads the whole partition instead.

use super::map::{Region, RegionKind};

pub const MAGIC_OFFSET: u64 = 1024 + 0x38;

const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;

fn u16at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

pub fn is_ext4(sb: &[u8]) -> bool {
    sb.len() >= 1024 && u16at(sb, 0x38) == 0xef53
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    if n == 0 {
        return false;
    }
    while n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// Splits the filesystem at `offset` (length `len`) into used and free
/// regions. `read` reads bytes at an absolute disk offset and counts them.
pub fn regions(
    offset: u64,
    len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<Vec<Region>>> {
    let sb = read(offset + 1024, 1024)?;
    if !is_ext4(&sb) {
        return Ok(None);
    }
    let log_bs = u32at(&sb, 0x18);
    if log_bs > 6 {
        return Ok(None);
    }
    let bs = 1024u64 << log_bs;
    let compat = u32at(&sb, 0x5c);
    let incompat = u32at(&sb, 0x60);
    let ro = u32at(&sb, 0x64);
    if incompat & INCOMPAT_META_BG != 0
        || ro & RO_COMPAT_BIGALLOC != 0
        || compat & COMPAT_SPARSE_SUPER2 != 0
    {
        return Ok(None);
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let blocks = u32at(&sb, 0x4) as u64
        | if is64 {
            (u32at(&sb, 0x150) as u64) << 32
        } else {
            0
        };
    let first_data = u32at(&sb, 0x14) as u64;
    let bpg = u32at(&sb, 0x20) as u64;
    let ipg = u32at(&sb, 0x28) as u64;
    let inode_size = u16at(&sb, 0x58) as u64;
    let reserved_gdt = u16at(&sb, 0xce) as u64;
    let desc_size = if is64 {
        u16at(&sb, 0xfe).max(32) as u64
    } else {
        32
    };
    if bpg == 0 || bpg > bs * 8 || blocks * bs > len || inode_size == 0 || blocks <= first_data {
        return Ok(None);
    }
    let csum = ro & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0;
    let sparse = ro & RO_COMPAT_SPARSE_SUPER != 0;
    let groups = (blocks - first_data).div_ceil(bpg);
    let gdt_blocks = (groups * desc_size).div_ceil(bs);
    let gdt = read(offset + (first_data + 1) * bs, (gdt_blocks * bs) as usize)?;
    let itable_blocks = (ipg * inode_size).div_ceil(bs);

    let mut used = vec![0u64; (blocks as usize).div_ceil(64)];
    let set = |used: &mut Vec<u64>, from: u64, n: u64, on: bool| {
        for b in from..(from + n).min(blocks) {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if on {
                used[w] |= 1 << bit;
            } else {
                used[w] &= !(1 << bit);
            }
        }
    };
    let has_super =
        |g: u64| !sparse || g <= 1 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7);
    struct Desc {
        block_bitmap: u64,
        inode_bitmap: u64,
        inode_table: u64,
        flags: u16,
        itable_unused: u64,
    }
    let mut descs = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let d = &gdt[(g * desc_size) as usize..((g + 1) * desc_size) as usize];
        let hi = |o: usize| {
            if is64 && desc_size >= 64 {
                (u32at(d, o) as u64) << 32
            } else {
                0
            }
        };
        descs.push(Desc {
            block_bitmap: u32at(d, 0) as u64 | hi(0x20),
            inode_bitmap: u32at(d, 4) as u64 | hi(0x24),
            inode_table: u32at(d, 8) as u64 | hi(0x28),
            flags: u16at(d, 0x12),
            itable_unused: u16at(d, 0x1c) as u64
                | if is64 && desc_size >= 64 {
                    (u16at(d, 0x32) as u64) << 16
                } else {
                    0
                },
        });
    }
    // Block 0 (boot sector, superblock at 1 KiB) is always read.
    set(&mut used, 0, first_data + 1, true);
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        let start = first_data + g * bpg;
        let n = bpg.min(blocks - start);
        if csum && d.flags & BG_BLOCK_UNINIT != 0 {
            if has_super(g) {
                set(&mut used, start, 1 + gdt_blocks + reserved_gdt, true);
            }
        } else {
            let bm = read(offset + d.block_bitmap * bs, (n as usize).div_ceil(8))?;
            for i in 0..n {
                if bm[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                    set(&mut used, start + i, 1, true);
                }
            }
        }
    }
    for d in &descs {
        set(&mut used, d.block_bitmap, 1, true);
        set(&mut used, d.inode_bitmap, 1, true);
        // Inode table blocks past the group's last used inode hold nothing.
        let live_inodes = if !csum {
            ipg
        } else if d.flags & BG_INODE_UNINIT != 0 {
            0
        } else {
            ipg.saturating_sub(d.itable_unused)
        };
        let live = (live_inodes * inode_size).div_ceil(bs);
        set(&mut used, d.inode_table, live, true);
        set(&mut used, d.inode_table + live, itable_blocks - live, false);
    }
    let mut out = Vec::new();
    let mut b = 0u64;
    while b < blocks {
        let on = used[(b / 64) as usize] & (1 << (b % 64)) != 0;
        let mut e = b + 1;
        while e < blocks && (used[(e / 64) as usize] & (1 << (e % 64)) != 0) == on {
            e += 1;
        }
        out.push(Region {
            start: offset + b * bs,
            len: (e - b) * bs,
            kind: if on {
                RegionKind::Read
            } else {
                RegionKind::Free
            },
        });
        b = e;
    }
    if blocks * bs < len {
        out.push(Region {
            start: offset + blocks * bs,
            len: len - blocks * bs,
            kind: RegionKind::Read,
        });
    }
    Ok(Some(out))
}
