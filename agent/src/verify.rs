//! Checks an image against its manifest: the compressed file's size and
//! BLAKE3, every data range's BLAKE3, zeros everywhere else, and the disk
//! size. Accepts the `.raw.zst` image or a raw disk (decompressed image).
//!
//! [`RangeWalker`] is the range-by-range check itself; `kiln-agent deploy`
//! runs the same walker over the stream it writes.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use kiln_spool::manifest::{DataRange, ImageManifest};
use kiln_spool::stream::{HashReader, HashWriter};

use crate::error::{check_abort, Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};

/// A piece of the decompressed disk, as [`RangeWalker::feed`] hands it on.
pub(crate) enum Piece<'a> {
    /// Bytes of a data range, starting at disk offset `offset`.
    Data { offset: u64, bytes: &'a [u8] },
    /// A range has been seen whole and hashed.
    RangeDone(std::result::Result<(), RangeMismatch>),
}

/// A data range whose bytes do not hash to what the manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RangeMismatch {
    pub index: usize,
    pub offset: u64,
    pub end: u64,
    pub got: String,
    pub want: String,
}

impl RangeMismatch {
    /// `range 3 (bytes X..Y) has BLAKE3 A, the {whose} manifest says B`.
    pub fn describe(&self, whose: &str) -> String {
        format!(
            "range {} (bytes {}..{}) has BLAKE3 {}, the {whose}manifest says {}",
            self.index, self.offset, self.end, self.got, self.want
        )
    }
}

/// Walks the decompressed disk, buffer by buffer, against the manifest's
/// sorted data ranges: hashes each range, hands its bytes on, and notes
/// the first non-zero byte outside every range.
pub(crate) struct RangeWalker<'m> {
    ranges: &'m [DataRange],
    pos: u64,
    next: usize,
    hash: Option<HashWriter<std::io::Sink>>,
    first_nonzero: Option<u64>,
}

impl<'m> RangeWalker<'m> {
    pub fn new(ranges: &'m [DataRange]) -> Self {
        RangeWalker {
            ranges,
            pos: 0,
            next: 0,
            hash: None,
            first_nonzero: None,
        }
    }

    /// Disk offset of the next byte to feed.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The first byte outside every range that is not zero, if one was seen.
    pub fn first_nonzero(&self) -> Option<u64> {
        self.first_nonzero
    }

    /// Feeds the next `buf.len()` bytes of the disk.
    pub fn feed(
        &mut self,
        buf: &[u8],
        sink: &mut dyn FnMut(Piece<'_>) -> Result<()>,
    ) -> Result<()> {
        let n = buf.len();
        let mut i = 0usize;
        while i < n {
            let at = self.pos + i as u64;
            match self.ranges.get(self.next) {
                Some(r) if at >= r.offset => {
                    let end = r.offset + r.length;
                    let k = ((end - at) as usize).min(n - i);
                    let bytes = &buf[i..i + k];
                    self.hash
                        .get_or_insert_with(|| HashWriter::new(std::io::sink()))
                        .write_all(bytes)
                        .ctx(|| "hashing a range".to_string())?;
                    sink(Piece::Data { offset: at, bytes })?;
                    i += k;
                    if at + k as u64 == end {
                        let got = self
                            .hash
                            .take()
                            .map(|h| h.digest().blake3)
                            .unwrap_or_default();
                        let done = if got == r.blake3 {
                            Ok(())
                        } else {
                            Err(RangeMismatch {
                                index: self.next,
                                offset: r.offset,
                                end,
                                got,
                                want: r.blake3.clone(),
                            })
                        };
                        self.next += 1;
                        sink(Piece::RangeDone(done))?;
                    }
                }
                range => {
                    let k = range.map_or(n - i, |r| ((r.offset - at) as usize).min(n - i));
                    if self.first_nonzero.is_none() {
                        if let Some(z) = first_nonzero(&buf[i..i + k]) {
                            self.first_nonzero = Some(at + z as u64);
                        }
                    }
                    i += k;
                }
            }
        }
        self.pos += n as u64;
        Ok(())
    }

    /// What is wrong once the stream has ended: a non-zero byte outside the
    /// ranges, a range never reached, a disk of the wrong size.
    pub fn finish(&self, disk_size: u64) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(z) = self.first_nonzero {
            problems.push(format!(
                "byte {z} is outside every data range but is not zero"
            ));
        }
        if self.next < self.ranges.len() {
            problems.push(format!(
                "the image ends at byte {} before data range {} does",
                self.pos, self.next
            ));
        }
        if self.pos != disk_size {
            problems.push(format!(
                "the image holds {} bytes, the manifest says the disk has {disk_size}",
                self.pos
            ));
        }
        problems
    }
}

/// Where disk byte `pos` lies, for an error about the stream there:
/// `in range 3 (bytes X..Y)`, or the range that comes next (a decoder that
/// fails at `pos` failed on data at or after it).
pub(crate) fn where_in(ranges: &[DataRange], pos: u64) -> String {
    let i = ranges.partition_point(|r| r.offset + r.length <= pos);
    match ranges.get(i) {
        Some(r) if r.offset <= pos => {
            format!("in range {i} (bytes {}..{})", r.offset, r.offset + r.length)
        }
        Some(r) => format!(
            "at disk byte {pos}, where range {i} (bytes {}..{}) is next",
            r.offset,
            r.offset + r.length
        ),
        None => format!("at disk byte {pos}, after the last range"),
    }
}

/// Index of the first non-zero byte. Whole blocks are OR-ed together, which
/// the compiler turns into vector instructions: most of a disk is zeros.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    const STEP: usize = 4096;
    let mut start = 0;
    for block in buf.chunks(STEP) {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return block.iter().position(|&b| b != 0).map(|z| start + z);
        }
        start += block.len();
    }
    None
}

/// Verifies `image` against `manifest`; the error lists what does not match.
pub fn verify(
    image: &Path,
    manifest: &ImageManifest,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<()> {
    let mut f = File::open(image).ctx(|| format!("opening {}", image.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .ctx(|| format!("reading {}", image.display()))?;
    let compressed = n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd];
    let f = File::open(image).ctx(|| format!("opening {}", image.display()))?;
    let mut hr = HashReader::new(BufReader::with_capacity(1 << 20, f));
    let mut problems = Vec::new();
    {
        let mut raw: Box<dyn Read + '_> = if compressed {
            Box::new(zstd::stream::read::Decoder::new(&mut hr).ctx(|| "starting zstd".to_string())?)
        } else {
            Box::new(&mut hr)
        };
        let mut buf = vec![0u8; 4 << 20];
        let mut walker = RangeWalker::new(&manifest.ranges);
        let mut throttle = Throttle::new(Phase::Verify, manifest.disk_size);
        loop {
            check_abort(abort)?;
            let n = match raw.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!(
                        "the image does not decompress after byte {}: {e}",
                        walker.position()
                    ));
                    break;
                }
            };
            walker.feed(&buf[..n], &mut |piece| {
                if let Piece::RangeDone(Err(m)) = piece {
                    problems.push(m.describe(""));
                }
                Ok(())
            })?;
            throttle.update(walker.position().min(manifest.disk_size), events);
        }
        problems.extend(walker.finish(manifest.disk_size));
    }
    if compressed {
        std::io::copy(&mut hr, &mut std::io::sink())
            .ctx(|| format!("reading {}", image.display()))?;
        let got = hr.digest();
        if got.size != manifest.image_size {
            problems.push(format!(
                "the file has {} bytes, the manifest says {}",
                got.size, manifest.image_size
            ));
        }
        if got.blake3 != manifest.image_blake3 {
            problems.push(format!(
                "the file's BLAKE3 is {}, the manifest says {}",
                got.blake3, manifest.image_blake3
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} does not match its manifest: {}",
            image.display(),
            problems.join("; ")
        )))
    }
}

/// Reads and parses a manifest file.
pub fn load_manifest(path: &Path) -> Result<ImageManifest> {
    let text = std::fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    ImageManifest::parse(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nonzero_byte_is_found_anywhere() {
        let mut buf = vec![0u8; 3 * 4096 + 100];
        assert_eq!(first_nonzero(&buf), None);
        for at in [0, 4095, 4096, 3 * 4096 + 99] {
            buf[at] = 1;
            assert_eq!(first_nonzero(&buf), Some(at));
            buf[at] = 0;
        }
    }
}
