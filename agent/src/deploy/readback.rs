//! Readback: after the write is flushed, the cached pages of the disk are
//! dropped and every data range is read back from the device and hashed.
//! A reader thread fills 4 MiB buffers while the caller hashes.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, sync_channel};

use kiln_spool::manifest::ImageManifest;

use super::Target;
use crate::error::{check_abort, Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};
use crate::verify::RangeMismatch;

const BUFFER: usize = 4 << 20;
const BUFFERS: usize = 4;
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Drops the cached pages of the image's bytes, so that the readback reads
/// the device rather than memory. Call after the data is flushed.
pub(super) fn drop_cache(target: &Target, m: &ImageManifest) {
    let fd = target.file.as_raw_fd();
    if target.block {
        // SAFETY: BLKFLSBUF takes no argument.
        unsafe { libc::ioctl(fd, BLKFLSBUF as _, 0) };
    }
    // SAFETY: posix_fadvise only takes the descriptor, a range and advice.
    unsafe { libc::posix_fadvise(fd, 0, m.disk_size as libc::off_t, libc::POSIX_FADV_DONTNEED) };
}

/// Reads every data range back and checks its BLAKE3.
pub(super) fn readback(
    target: &Target,
    m: &ImageManifest,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<()> {
    drop_cache(target, m);
    let total = m.data_bytes();
    let mut throttle = Throttle::new(Phase::Readback, total);
    let (full_tx, full_rx) = sync_channel::<(usize, Vec<u8>, usize)>(BUFFERS - 1);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; BUFFER]);
    }
    let file = &target.file;
    let path = &target.path;
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<()> {
            for (i, r) in m.ranges.iter().enumerate() {
                let mut at = r.offset;
                let end = r.offset + r.length;
                while at < end {
                    let Ok(mut buf) = free_rx.recv() else {
                        return Ok(());
                    };
                    let k = ((end - at) as usize).min(BUFFER);
                    file.read_exact_at(&mut buf[..k], at).ctx(|| {
                        format!(
                            "reading back bytes {at}..{} of {}",
                            at + k as u64,
                            path.display()
                        )
                    })?;
                    at += k as u64;
                    if full_tx.send((i, buf, k)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        let mut result = Ok(());
        let mut hasher = blake3::Hasher::new();
        let mut current = 0usize;
        let mut in_range = 0u64;
        let mut done = 0u64;
        for (i, buf, k) in full_rx.iter() {
            if let Err(e) = check_abort(abort) {
                result = Err(e);
                break;
            }
            debug_assert_eq!(i, current);
            hasher.update(&buf[..k]);
            in_range += k as u64;
            done += k as u64;
            let _ = free_tx.send(buf);
            let r = &m.ranges[current];
            if in_range == r.length {
                let got = hasher.finalize().to_hex().to_string();
                if got != r.blake3 {
                    let mismatch = RangeMismatch {
                        index: current,
                        offset: r.offset,
                        end: r.offset + r.length,
                        got,
                        want: r.blake3.clone(),
                    };
                    result = Err(Error::Failed(format!(
                        "read back from {}: {}",
                        path.display(),
                        mismatch.describe("signed ")
                    )));
                    break;
                }
                hasher = blake3::Hasher::new();
                current += 1;
                in_range = 0;
            }
            throttle.update(done, events);
        }
        drop(full_rx);
        drop(free_tx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(Error::Failed("the readback thread panicked".into())));
        result?;
        read?;
        if current != m.ranges.len() {
            return Err(Error::Failed(format!(
                "read back {} of {} data ranges of {}",
                current,
                m.ranges.len(),
                path.display()
            )));
        }
        Ok(())
    })
}
