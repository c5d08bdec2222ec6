//! Checks an image against its manifest: the compressed file's size and
//! BLAKE3, every data range's BLAKE3, zeros everywhere else, and the disk
//! size. Accepts the `.raw.zst` image or a raw disk (decompressed image).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use kiln_spool::manifest::ImageManifest;
use kiln_spool::stream::{HashReader, HashWriter};

use crate::error::{check_abort, Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};

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
        let mut pos = 0u64;
        let mut ri = 0usize;
        let mut h: Option<HashWriter<std::io::Sink>> = None;
        let mut first_nonzero: Option<u64> = None;
        let mut throttle = Throttle::new(Phase::Verify, manifest.disk_size);
        loop {
            check_abort(abort)?;
            let n = match raw.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!(
                        "the image does not decompress after byte {pos}: {e}"
                    ));
                    break;
                }
            };
            let mut i = 0usize;
            while i < n {
                let at = pos + i as u64;
                let range = manifest.ranges.get(ri);
                match range {
                    Some(r) if at >= r.offset => {
                        let end = r.offset + r.length;
                        let k = ((end - at) as usize).min(n - i);
                        h.get_or_insert_with(|| HashWriter::new(std::io::sink()))
                            .write_all(&buf[i..i + k])
                            .ctx(|| "hashing a range".to_string())?;
                        i += k;
                        if at + k as u64 == end {
                            let got = h.take().map(|h| h.digest().blake3);
                            if got.as_deref() != Some(r.blake3.as_str()) {
                                problems.push(format!(
                                    "range {ri} (bytes {}..{end}) has BLAKE3 {}, the manifest says {}",
                                    r.offset,
                                    got.unwrap_or_default(),
                                    r.blake3
                                ));
                            }
                            ri += 1;
                        }
                    }
                    _ => {
                        let k = range.map_or(n - i, |r| ((r.offset - at) as usize).min(n - i));
                        if first_nonzero.is_none() {
                            if let Some(z) = buf[i..i + k].iter().position(|&b| b != 0) {
                                first_nonzero = Some(at + z as u64);
                            }
                        }
                        i += k;
                    }
                }
            }
            pos += n as u64;
            throttle.update(pos.min(manifest.disk_size), events);
        }
        if let Some(z) = first_nonzero {
            problems.push(format!(
                "byte {z} is outside every data range but is not zero"
            ));
        }
        if ri < manifest.ranges.len() {
            problems.push(format!(
                "the image ends at byte {pos} before data range {ri} does"
            ));
        }
        if pos != manifest.disk_size {
            problems.push(format!(
                "the image holds {pos} bytes, the manifest says the disk has {}",
                manifest.disk_size
            ));
        }
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
