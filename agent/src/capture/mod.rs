//! Block-level capture: reads the blocks in use (see [`map`]), drops
//! all-zero blocks, and writes one zstd stream that decompresses to the raw
//! disk, hashing each data range and the compressed file with BLAKE3.
//!
//! Data goes through a multithreaded zstd encoder. A long run of zeros (a
//! free area, or zero blocks read) ends the current zstd frame and is
//! written as a frame of RLE blocks: four bytes per 128 KiB, so a mostly
//! empty disk costs nothing to compress. A zstd file may hold any number of
//! frames; `zstd -d` and every decoder concatenate them.

pub mod ext4;
pub mod fat;
pub mod map;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;

use kiln_spool::manifest::DataRange;
use zstd::stream::raw::{Encoder as RawEncoder, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe::CParameter;

use crate::error::{Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};
use map::RegionKind;

/// Granularity of zero detection and of the data map.
pub const BLOCK: u64 = 4096;
const CHUNK: u64 = 4 << 20;
/// Data ranges closer than this are merged (the zeros between them hashed
/// in), which keeps the manifest short on fragmented filesystems.
const MERGE_GAP: u64 = 1 << 20;
/// Zero runs at least this long become an RLE frame instead of encoder input.
const ZERO_FRAME_MIN: u64 = 1 << 20;
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// What a capture produced; the manifest is built from it.
#[derive(Debug, Clone)]
pub struct CaptureResult {
    pub disk_size: u64,
    pub block_size: u64,
    pub bytes_read: u64,
    pub image_size: u64,
    pub image_blake3: String,
    pub ranges: Vec<DataRange>,
    /// One line per partition: how it was read.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct CaptureOptions {
    /// zstd level, 1 to 22.
    pub level: i32,
    /// zstd worker threads; 0 picks the number of CPUs.
    pub threads: u32,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            level: 3,
            threads: 0,
        }
    }
}

/// Writes through to a file, counting and hashing what passes.
struct HashingWriter {
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    count: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A sequence of zstd frames: encoder frames for data, RLE frames for zeros.
struct FrameWriter {
    enc: RawEncoder<'static>,
    out: HashingWriter,
    buf: Vec<u8>,
    in_frame: bool,
}

impl FrameWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let mut output = OutBuffer::around(&mut self.buf[..]);
            self.enc.run(&mut input, &mut output)?;
            let n = output.pos();
            self.out.write_all(&self.buf[..n])?;
        }
        self.in_frame = true;
        Ok(())
    }

    fn end_frame(&mut self) -> std::io::Result<()> {
        if !self.in_frame {
            return Ok(());
        }
        loop {
            let mut output = OutBuffer::around(&mut self.buf[..]);
            let remaining = self.enc.finish(&mut output, true)?;
            let n = output.pos();
            self.out.write_all(&self.buf[..n])?;
            if remaining == 0 {
                break;
            }
        }
        self.enc.reinit()?;
        self.in_frame = false;
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> std::io::Result<()> {
        if n >= ZERO_FRAME_MIN {
            self.end_frame()?;
            return self.out.write_all(&rle_zero_frame(n));
        }
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// A zstd frame of `n` zero bytes made of RLE blocks (RFC 8878, 3.1.1):
/// no content size, a 128 KiB window, each block a 3-byte header and one byte.
pub fn rle_zero_frame(n: u64) -> Vec<u8> {
    const MAX_BLOCK: u64 = 128 << 10;
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
    let mut left = n;
    while left > 0 {
        let size = left.min(MAX_BLOCK);
        left -= size;
        let last = u32::from(left == 0);
        let header = last | (1 << 1) | ((size as u32) << 3);
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

/// Builds the data ranges and their hashes as data passes in disk order.
struct Ranges {
    done: Vec<DataRange>,
    current: Option<(u64, u64, blake3::Hasher)>,
}

impl Ranges {
    fn data(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if let Some((_, cur_end, h)) = self.current.as_mut() {
            if offset - *cur_end <= MERGE_GAP {
                let mut gap = offset - *cur_end;
                while gap > 0 {
                    let k = gap.min(ZEROS.len() as u64) as usize;
                    h.update(&ZEROS[..k]);
                    gap -= k as u64;
                }
                h.update(bytes);
                *cur_end = end;
                return;
            }
        }
        self.close();
        let mut h = blake3::Hasher::new();
        h.update(bytes);
        self.current = Some((offset, end, h));
    }

    fn close(&mut self) {
        if let Some((start, end, h)) = self.current.take() {
            self.done.push(DataRange {
                offset: start,
                length: end - start,
                blake3: h.finalize().to_hex().to_string(),
            });
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    let acc = chunks.by_ref().fold(0u128, |a, c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        a | u128::from_ne_bytes(w)
    });
    acc == 0 && chunks.remainder().iter().all(|&x| x == 0)
}

enum Piece {
    Data(u64, Vec<u8>),
    Free(u64),
}

/// Captures `disk` (a block device or a file) into `out`.
pub fn capture(
    disk: &Path,
    out: &Path,
    opts: &CaptureOptions,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<CaptureResult> {
    let file = File::open(disk).ctx(|| format!("opening {} to capture it", disk.display()))?;
    let size = crate::disk::size_of(&file, disk)?;
    let sector = crate::disk::sector_size(&file);
    let dmap = map::map_disk(&file, size, sector)
        .ctx(|| format!("reading the filesystems of {}", disk.display()))?;
    let out_file = File::create(out).ctx(|| format!("creating {}", out.display()))?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.threads
    };
    let mut enc = RawEncoder::new(opts.level).ctx(|| "starting zstd".to_string())?;
    enc.set_parameter(CParameter::NbWorkers(threads))
        .ctx(|| "starting zstd worker threads".to_string())?;
    let mut w = FrameWriter {
        enc,
        out: HashingWriter {
            out: BufWriter::with_capacity(1 << 20, out_file),
            hasher: blake3::Hasher::new(),
            count: 0,
        },
        buf: vec![0u8; 1 << 20],
        in_frame: false,
    };
    let mut ranges = Ranges {
        done: vec![],
        current: None,
    };
    let mut throttle = Throttle::new(Phase::Capture, size);
    let mut bytes_read = dmap.bytes_read;
    let regions = dmap.regions.clone();
    let wr = |e: std::io::Error| Error::Io {
        what: format!("writing {}", out.display()),
        source: e,
    };
    let reader_result = std::thread::scope(|s| -> Result<u64> {
        let (tx, rx) = sync_channel::<std::io::Result<Piece>>(4);
        let file = &file;
        let reader = s.spawn(move || {
            let mut read = 0u64;
            for r in &regions {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                match r.kind {
                    RegionKind::Free => {
                        if tx.send(Ok(Piece::Free(r.len))).is_err() {
                            break;
                        }
                    }
                    RegionKind::Read => {
                        let mut off = r.start;
                        let end = r.start + r.len;
                        while off < end && !abort.load(Ordering::Relaxed) {
                            let n = (CHUNK - off % CHUNK).min(end - off) as usize;
                            let mut buf = vec![0u8; n];
                            let res = file
                                .read_exact_at(&mut buf, off)
                                .map(|_| Piece::Data(off, buf));
                            let failed = res.is_err();
                            read += n as u64;
                            if tx.send(res).is_err() || failed {
                                return read;
                            }
                            off += n as u64;
                        }
                    }
                }
            }
            read
        });
        let mut pos = 0u64;
        let mut zeros = 0u64;
        for piece in rx {
            if abort.load(Ordering::Relaxed) {
                return Err(Error::Aborted);
            }
            match piece.ctx(|| format!("reading {}", disk.display()))? {
                Piece::Free(n) => {
                    zeros += n;
                    pos += n;
                }
                Piece::Data(off, buf) => {
                    let mut i = 0usize;
                    while i < buf.len() {
                        // Blocks are aligned to the disk, not to the buffer.
                        let blk_end = (((off + i as u64) / BLOCK + 1) * BLOCK - off) as usize;
                        let j = blk_end.min(buf.len());
                        if is_zero(&buf[i..j]) {
                            zeros += (j - i) as u64;
                            i = j;
                            continue;
                        }
                        // Extend over following non-zero blocks.
                        let mut k = j;
                        while k < buf.len() {
                            let e = (k + BLOCK as usize).min(buf.len());
                            if is_zero(&buf[k..e]) {
                                break;
                            }
                            k = e;
                        }
                        if zeros > 0 {
                            w.zeros(zeros).map_err(wr)?;
                            zeros = 0;
                        }
                        w.write(&buf[i..k]).map_err(wr)?;
                        ranges.data(off + i as u64, &buf[i..k]);
                        i = k;
                    }
                    pos = off + buf.len() as u64;
                }
            }
            throttle.update(pos, events);
        }
        let read = reader.join().unwrap_or(0);
        if abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted);
        }
        if pos != size {
            return Err(Error::Failed(format!(
                "capture of {} stopped at byte {pos} of {size}",
                disk.display()
            )));
        }
        if zeros > 0 {
            w.zeros(zeros).map_err(wr)?;
        }
        Ok(read)
    });
    bytes_read += reader_result?;
    w.end_frame().map_err(wr)?;
    ranges.close();
    let mut hw = w.out;
    hw.flush().map_err(wr)?;
    let file = hw.out.into_inner().map_err(|e| wr(e.into_error()))?;
    file.sync_all()
        .ctx(|| format!("flushing {}", out.display()))?;
    Ok(CaptureResult {
        disk_size: size,
        block_size: BLOCK,
        bytes_read,
        image_size: hw.count,
        image_blake3: hw.hasher.finalize().to_hex().to_string(),
        ranges: ranges.done,
        notes: dmap.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_zero_frames_decode_to_zeros_between_data_frames() {
        let mut file = zstd::encode_all(&b"head"[..], 3).unwrap();
        file.extend(rle_zero_frame((3 << 20) + 5));
        file.extend(zstd::encode_all(&b"tail"[..], 3).unwrap());
        let raw = zstd::decode_all(&file[..]).unwrap();
        assert_eq!(raw.len(), 4 + (3 << 20) + 5 + 4);
        assert_eq!(&raw[..4], b"head");
        assert!(raw[4..raw.len() - 4].iter().all(|&b| b == 0));
        assert_eq!(&raw[raw.len() - 4..], b"tail");
    }

    #[test]
    fn zero_detection_sees_a_single_bit() {
        let mut b = vec![0u8; 4096 + 3];
        assert!(is_zero(&b));
        b[4097] = 0x80;
        assert!(!is_zero(&b));
    }
}
