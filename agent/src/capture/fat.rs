//! Which clusters of a FAT12/16/32 filesystem are in use, from its FAT.
//! The reserved area, the FATs and the FAT12/16 root directory are always
//! read; free clusters are not.

use super::map::{Region, RegionKind};

fn u16at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

pub fn regions(
    offset: u64,
    len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<Vec<Region>>> {
    let bs = read(offset, 512)?;
    if bs[510] != 0x55 || bs[511] != 0xaa {
        return Ok(None);
    }
    let is_fat = &bs[0x36..0x39] == b"FAT" || &bs[0x52..0x57] == b"FAT32";
    let bps = u16at(&bs, 11) as u64;
    let spc = bs[13] as u64;
    let rsvd = u16at(&bs, 14) as u64;
    let nfats = bs[16] as u64;
    let root_ents = u16at(&bs, 17) as u64;
    let tot = if u16at(&bs, 19) != 0 {
        u16at(&bs, 19) as u64
    } else {
        u32at(&bs, 32) as u64
    };
    let fatsz = if u16at(&bs, 22) != 0 {
        u16at(&bs, 22) as u64
    } else {
        u32at(&bs, 36) as u64
    };
    if !is_fat
        || ![512, 1024, 2048, 4096].contains(&bps)
        || spc == 0
        || !spc.is_power_of_two()
        || rsvd == 0
        || nfats == 0
        || fatsz == 0
        || tot * bps > len
    {
        return Ok(None);
    }
    let root_secs = (root_ents * 32).div_ceil(bps);
    let first_data = rsvd + nfats * fatsz + root_secs;
    if first_data >= tot {
        return Ok(None);
    }
    let clusters = (tot - first_data) / spc;
    let fat = read(offset + rsvd * bps, (fatsz * bps) as usize)?;
    let entry = |n: u64| -> u32 {
        if clusters < 4085 {
            let o = (n + n / 2) as usize;
            let v = u16at(&fat, o) as u32;
            if n % 2 == 1 {
                v >> 4
            } else {
                v & 0xfff
            }
        } else if clusters < 65525 {
            u16at(&fat, (n * 2) as usize) as u32
        } else {
            u32at(&fat, (n * 4) as usize) & 0x0fff_ffff
        }
    };
    let bytes_needed = if clusters < 4085 {
        (clusters + 2) * 3 / 2 + 2
    } else if clusters < 65525 {
        (clusters + 2) * 2
    } else {
        (clusters + 2) * 4
    };
    if bytes_needed > fat.len() as u64 {
        return Ok(None);
    }
    let cbytes = spc * bps;
    let data_start = offset + first_data * bps;
    let mut out = vec![Region {
        start: offset,
        len: first_data * bps,
        kind: RegionKind::Read,
    }];
    let mut c = 0u64;
    while c < clusters {
        let on = entry(c + 2) != 0;
        let mut e = c + 1;
        while e < clusters && (entry(e + 2) != 0) == on {
            e += 1;
        }
        out.push(Region {
            start: data_start + c * cbytes,
            len: (e - c) * cbytes,
            kind: if on {
                RegionKind::Read
            } else {
                RegionKind::Free
            },
        });
        c = e;
    }
    let end = data_start + clusters * cbytes;
    if end < offset + len {
        out.push(Region {
            start: end,
            len: offset + len - end,
            kind: RegionKind::Read,
        });
    }
    Ok(Some(out))
}
