//! The write: the compressed image is decompressed on the calling thread
//! and handed, 4 MiB at a time through a bounded channel, to a writer
//! thread that walks the data ranges ([`RangeWalker`]), hashes each one,
//! checks that everything between them is zero and writes only the ranges,
//! with one `pwrite` per buffer. The first MiB of the first range (the
//! partition tables) stays in memory and is written last, once every range
//! and the whole compressed stream matched the signed manifest.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, sync_channel};

use kiln_spool::manifest::ImageManifest;
use kiln_spool::stream::HashReader;

use super::{ImageSource, Target};
use crate::error::{check_abort, Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};
use crate::verify::{where_in, Piece, RangeWalker};

/// Bytes decompressed and written at once.
const BUFFER: usize = 4 << 20;
/// Buffers in flight: one being filled, the others queued or being written.
const BUFFERS: usize = 4;
/// The head of the first range, and the data in the last MiB of the
/// image's disk (the backup GPT), are held back until everything matched.
pub const HELD_BACK: u64 = 1 << 20;

/// Streams the compressed image once through BLAKE3 and compares its size
/// and hash with the signed manifest. Nothing is written.
pub(super) fn precheck(
    source: &mut dyn ImageSource,
    m: &ImageManifest,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<()> {
    let what = source.describe();
    let r = source.open().ctx(|| format!("opening {what}"))?;
    let mut hr = HashReader::new(r);
    let mut buf = vec![0u8; 1 << 20];
    let mut throttle = Throttle::new(Phase::Check, m.image_size);
    loop {
        check_abort(abort)?;
        let n = hr.read(&mut buf).ctx(|| format!("reading {what}"))?;
        if n == 0 {
            break;
        }
        let done = hr.digest().size;
        if done > m.image_size {
            return Err(Error::Input(format!(
                "{what} is longer than the {} bytes the signed manifest says",
                m.image_size
            )));
        }
        throttle.update(done, events);
    }
    let got = hr.digest();
    if got.size != m.image_size {
        return Err(Error::Input(format!(
            "{what} has {} bytes, the signed manifest says {}",
            got.size, m.image_size
        )));
    }
    if got.blake3 != m.image_blake3 {
        return Err(Error::Input(format!(
            "{what} has BLAKE3 {}, the signed manifest says {}",
            got.blake3, m.image_blake3
        )));
    }
    Ok(())
}

/// After a failed pre-check: decompresses the image once more, writing
/// nothing, and says where it first differs from the signed manifest: the
/// range whose BLAKE3 does not match, or where it stops decompressing.
/// `None` when it cannot tell (the stream matches range for range, say,
/// and only the compressed bytes differ).
pub(super) fn diagnose(
    source: &mut dyn ImageSource,
    m: &ImageManifest,
    abort: &AtomicBool,
) -> Option<String> {
    let r = source.open().ok()?;
    let mut decoder = zstd::stream::read::Decoder::new(r.take(m.image_size)).ok()?;
    let mut walker = RangeWalker::new(&m.ranges);
    let mut buf = vec![0u8; 1 << 20];
    let mut found = None;
    while found.is_none() {
        check_abort(abort).ok()?;
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Some(format!(
                    "it stops decompressing {}: {e}",
                    where_in(&m.ranges, walker.position())
                ))
            }
        };
        if walker.position() + n as u64 > m.disk_size {
            return Some(format!(
                "it decompresses to more than the {} bytes of the image's disk",
                m.disk_size
            ));
        }
        walker
            .feed(&buf[..n], &mut |piece| {
                if let Piece::RangeDone(Err(mismatch)) = piece {
                    found.get_or_insert_with(|| mismatch.describe("signed "));
                }
                Ok(())
            })
            .ok()?;
    }
    found.or_else(|| walker.finish(m.disk_size).into_iter().next())
}

/// Makes the bytes outside the data ranges read as zeros where that is
/// cheap: a regular file gets holes punched (zeros written where the
/// filesystem cannot punch), a block device gets those bytes discarded if
/// it supports discard. Returns a note for the caller when nothing could
/// be done.
pub(super) fn clear_gaps(target: &Target, m: &ImageManifest) -> Result<Option<String>> {
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for r in &m.ranges {
        if r.offset > at {
            gaps.push((at, r.offset - at));
        }
        at = r.offset + r.length;
    }
    if m.disk_size > at {
        gaps.push((at, m.disk_size - at));
    }
    let fd = target.file.as_raw_fd();
    for (start, len) in gaps {
        if target.block {
            let range: [u64; 2] = [start, len];
            // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer.
            let r = unsafe { libc::ioctl(fd, BLKDISCARD as _, &range) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                ) {
                    return Ok(Some(format!(
                        "{} does not support discard: the bytes outside the image's data ranges keep their old contents",
                        target.path.display()
                    )));
                }
                return Err(e).ctx(|| {
                    format!(
                        "discarding bytes {start}..{} of {}",
                        start + len,
                        target.path.display()
                    )
                });
            }
        } else {
            // SAFETY: fallocate takes the descriptor, flags and a byte range.
            let r = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(e).ctx(|| {
                        format!(
                            "punching a hole at bytes {start}..{} of {}",
                            start + len,
                            target.path.display()
                        )
                    });
                }
                write_zeros(&target.file, start, len).ctx(|| {
                    format!(
                        "zeroing bytes {start}..{} of {}",
                        start + len,
                        target.path.display()
                    )
                })?;
            }
        }
    }
    Ok(None)
}

const BLKDISCARD: libc::c_ulong = 0x1277;

fn write_zeros(file: &File, start: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; BUFFER];
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(BUFFER as u64) as usize;
        file.write_all_at(&zeros[..k], start + done)?;
        done += k as u64;
    }
    Ok(())
}

/// Starts writing the range out to the device without waiting, so that
/// the final `fsync` finds little left to do: the disk works while the
/// next buffers are decompressed.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range takes the descriptor, a byte range and flags.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The bytes that make the disk look partitioned: the first range's head
/// (the protective MBR and primary GPT) and whatever data lies in the last
/// MiB of the image's disk (the backup GPT, which firmware may restore the
/// primary from). They are kept in memory and written last, tail first.
struct HeldBack {
    /// Byte windows of the disk that are held: head, then tail.
    windows: [(u64, u64); 2],
    /// Held pieces, in disk order: (offset, bytes).
    pieces: Vec<(u64, Vec<u8>)>,
}

impl HeldBack {
    fn new(m: &ImageManifest) -> HeldBack {
        let head = m
            .ranges
            .first()
            .map_or((0, 0), |r| (r.offset, r.offset + r.length.min(HELD_BACK)));
        let tail_start = m.disk_size.saturating_sub(HELD_BACK).max(head.1);
        HeldBack {
            windows: [head, (tail_start, m.disk_size)],
            pieces: Vec::new(),
        }
    }

    /// Keeps the parts of `bytes` (at `offset`) that fall in a window;
    /// returns the parts to write now.
    fn take<'b>(&mut self, offset: u64, bytes: &'b [u8]) -> Vec<(u64, &'b [u8])> {
        let end = offset + bytes.len() as u64;
        let mut now = Vec::new();
        let mut at = offset;
        for (ws, we) in self.windows {
            if we <= at || ws >= end || ws == we {
                continue;
            }
            let (s, e) = (ws.max(at), we.min(end));
            if s > at {
                now.push((at, &bytes[(at - offset) as usize..(s - offset) as usize]));
            }
            self.pieces.push((
                s,
                bytes[(s - offset) as usize..(e - offset) as usize].to_vec(),
            ));
            at = e;
        }
        if at < end {
            now.push((at, &bytes[(at - offset) as usize..]));
        }
        now
    }

    /// Bytes held in total.
    fn len(&self) -> u64 {
        self.pieces.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// Decompresses the image and writes its data ranges; returns the bytes
/// written. Every range's BLAKE3, the zeros between them and, at the end,
/// the compressed stream's size and BLAKE3 must match the signed manifest.
pub(super) fn write_image(
    source: &mut dyn ImageSource,
    m: &ImageManifest,
    target: &Target,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<u64> {
    let what = source.describe();
    let r = source.open().ctx(|| format!("opening {what}"))?;
    let mut decoder = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
        1 << 20,
        HashReader::new(r),
    ))
    .ctx(|| format!("starting to decompress {what}"))?;
    let held = HeldBack::new(m);
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(BUFFERS - 1);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; BUFFER]);
    }
    let file = &target.file;
    let path = &target.path;
    let mut throttle = Throttle::new(Phase::Deploy, m.disk_size);
    let (written, held, read_err) = std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<(u64, Option<HeldBack>)> {
            let mut walker = RangeWalker::new(&m.ranges);
            let mut held = held;
            let mut written = 0u64;
            for (buf, len) in full_rx {
                walker.feed(&buf[..len], &mut |piece| match piece {
                    Piece::Data { offset, bytes } => {
                        for (offset, bytes) in held.take(offset, bytes) {
                            file.write_all_at(bytes, offset).ctx(|| {
                                format!(
                                    "writing bytes {offset}..{} of {}",
                                    offset + bytes.len() as u64,
                                    path.display()
                                )
                            })?;
                            written += bytes.len() as u64;
                            start_writeback(file, offset, bytes.len() as u64);
                        }
                        Ok(())
                    }
                    Piece::RangeDone(Ok(())) => Ok(()),
                    Piece::RangeDone(Err(mismatch)) => {
                        Err(Error::Failed(mismatch.describe("signed ")))
                    }
                })?;
                if let Some(z) = walker.first_nonzero() {
                    return Err(Error::Failed(format!(
                        "byte {z} of the image is outside every data range of the signed manifest but is not zero"
                    )));
                }
                // The reader may have stopped already; a buffer it no longer wants is dropped.
                let _ = free_tx.send(buf);
            }
            let problems = walker.finish(m.disk_size);
            if !problems.is_empty() {
                return Err(Error::Failed(format!(
                    "the image does not match the signed manifest: {}",
                    problems.join("; ")
                )));
            }
            Ok((written, Some(held)))
        });
        let mut pos = 0u64;
        let mut read_err = None;
        loop {
            if let Err(e) = check_abort(abort) {
                read_err = Some(e);
                break;
            }
            let Ok(mut buf) = free_rx.recv() else { break };
            let n = match read_full(&mut decoder, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    read_err = Some(Error::Failed(format!(
                        "{what} stops decompressing {}: {e}",
                        where_in(&m.ranges, pos)
                    )));
                    break;
                }
            };
            if n == 0 {
                break;
            }
            if pos + n as u64 > m.disk_size {
                read_err = Some(Error::Failed(format!(
                    "{what} decompresses to more than the {} bytes the signed manifest says",
                    m.disk_size
                )));
                break;
            }
            pos += n as u64;
            if full_tx.send((buf, n)).is_err() {
                break;
            }
            throttle.update(pos, events);
        }
        drop(full_tx);
        let w = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Failed("the writer thread panicked".into())));
        match w {
            Ok((written, held)) => (written, held, read_err),
            // A reader that stopped (abort, a broken stream) leaves the
            // writer short of ranges: the reader's reason comes first.
            Err(e) => (0, None, Some(read_err.unwrap_or(e))),
        }
    });
    if let Some(e) = read_err {
        return Err(e);
    }
    // The stream must still be the one checked before the write began.
    let mut rest = decoder.finish().into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).ctx(|| format!("reading {what}"))?;
    let got = rest.digest();
    if got.size != m.image_size || got.blake3 != m.image_blake3 {
        return Err(Error::Failed(format!(
            "{what} changed while it was written: it now has {} bytes and BLAKE3 {}, the signed manifest says {} bytes and {}",
            got.size, got.blake3, m.image_size, m.image_blake3
        )));
    }
    let mut written = written;
    if let Some(h) = held {
        // Tail first: the primary table, written last, makes the disk bootable.
        written += h.len();
        for (offset, bytes) in h.pieces.iter().rev() {
            file.write_all_at(bytes, *offset).ctx(|| {
                format!(
                    "writing the partition table area (bytes {offset}..{}) of {}",
                    offset + bytes.len() as u64,
                    path.display()
                )
            })?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::manifest::DataRange;
    use kiln_spool::time::Timestamp;

    #[test]
    fn the_table_areas_are_held_and_the_rest_written_now() {
        let range = |offset, length| DataRange {
            offset,
            length,
            blake3: String::new(),
        };
        let m = ImageManifest {
            format: "raw.zst".into(),
            job: String::new(),
            job_blake3: String::new(),
            agent: String::new(),
            disk_size: 8 << 20,
            block_size: 4096,
            bytes_read: 0,
            image_size: 1,
            image_blake3: String::new(),
            payloads: vec![],
            started: Timestamp(0),
            finished: Timestamp(0),
            phases: vec![],
            ranges: vec![range(0, 2 << 20), range((8 << 20) - 8192, 8192)],
            generalized: vec![],
            provenance: None,
        };
        let mut held = HeldBack::new(&m);
        let buf = vec![7u8; 4 << 20];
        let now = held.take(0, &buf[..2 << 20]);
        assert_eq!(now.len(), 1);
        assert_eq!((now[0].0, now[0].1.len()), (1 << 20, 1 << 20));
        let now = held.take((8 << 20) - 8192, &buf[..8192]);
        assert!(now.is_empty());
        let at: Vec<(u64, usize)> = held.pieces.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(at, [(0, 1 << 20), ((8 << 20) - 8192, 8192)]);
        assert_eq!(held.len(), (1 << 20) + 8192);
    }
}
