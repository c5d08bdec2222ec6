//! `kiln-master export`: a published image in the forms other tools take.
//!
//! One streaming pass over the published `image.raw.zst` checks it against
//! its manifest (the file's size and BLAKE3, every data range's BLAKE3,
//! zeros everywhere else, the disk's size) while it feeds every output: the
//! copy of the compressed file, the sparse raw disk, and the SHA-256 of each
//! bmap range. Outputs are written under temporary names in the output
//! directory and renamed only once the pass has checked everything, so an
//! image that does not match its manifest leaves nothing that looks like an
//! export.

use std::fs::{self, File};
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use quick_xml::events::{BytesDecl, BytesText, Event};
use quick_xml::Writer;
use sha2::{Digest as _, Sha256};

use kiln_spool::manifest::{DataRange, ImageManifest};
use kiln_spool::names::check_job_id;
use kiln_spool::spool::image_dir;
use kiln_spool::stream::HashReader;
use kiln_spool::units::human_bytes;
use kiln_spool::upload::{Published, IMAGE_FILE, MANIFEST, PUBLISHED, SIGNATURE};
use kiln_spool::LocalSpool;

/// The bmap format version `bmaptool copy` reads (bmap-tools 3.1 and later).
pub const BMAP_VERSION: &str = "2.0";
/// Length of a SHA-256 in hex, the width of `BmapFileChecksum`.
const SHA256_HEX: usize = 64;
/// Decompressed bytes handled at a time: memory stays at this one buffer.
const BUFFER: usize = 4 << 20;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("format").args(["bmap", "qcow2"]).required(true).multiple(true)))]
pub struct ExportArgs {
    /// The published image's id.
    pub id: String,
    /// The directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write ID.img.zst (or, with --raw, ID.img) and ID.img.bmap, which
    /// `bmaptool copy ID.img.zst /dev/sdX` finds by itself.
    #[arg(long)]
    pub bmap: bool,
    /// Write ID.qcow2 through `qemu-img convert`, for VMs and clouds.
    #[arg(long)]
    pub qcow2: bool,
    /// With --bmap: the image decompressed, as a sparse file ID.img.
    #[arg(long, requires = "bmap", conflicts_with = "zst")]
    pub raw: bool,
    /// With --bmap: the image as published, ID.img.zst (the default).
    #[arg(long, requires = "bmap")]
    pub zst: bool,
    /// Replace output files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// What the bmap file says about one run of mapped blocks: the byte span
/// `bmaptool` reads for it (whole blocks, the last one cut at the image's
/// end) and the SHA-256 of those bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// A bmap: the image's size, its block size and its mapped ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// Each mapped span with the SHA-256 (hex) of its bytes.
    pub ranges: Vec<(Span, String)>,
}

/// Checks the manifest's ranges: each non-empty, in order, disjoint, on the
/// disk. `Err` says which range is wrong.
pub fn check_ranges(manifest: &ImageManifest) -> Result<(), String> {
    let bs = manifest.block_size;
    if bs == 0 || !bs.is_power_of_two() {
        return Err(format!("block_size {bs} is not a power of two"));
    }
    let mut prev_end = 0u64;
    for (i, r) in manifest.ranges.iter().enumerate() {
        let end = r.offset.checked_add(r.length);
        match end {
            _ if r.length == 0 => return Err(format!("range {i} is empty")),
            None => return Err(format!("range {i} ends past 2^64")),
            Some(end) if end > manifest.disk_size => {
                return Err(format!(
                    "range {i} (bytes {}..{end}) ends past the disk's {} bytes",
                    r.offset, manifest.disk_size
                ))
            }
            Some(_) if i > 0 && r.offset < prev_end => {
                return Err(format!(
                    "range {i} starts at byte {}, before range {} ends at {prev_end}",
                    r.offset,
                    i - 1
                ))
            }
            Some(end) => prev_end = end,
        }
    }
    Ok(())
}

/// The spans a bmap maps for `ranges` (checked by [`check_ranges`]): each
/// rounded outward to whole blocks, cut at `disk_size`, and merged with its
/// neighbour when they touch, so that what `bmaptool` reads and hashes is
/// exactly what the span covers.
pub fn bmap_spans(ranges: &[DataRange], block_size: u64, disk_size: u64) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for r in ranges {
        let start = r.offset / block_size * block_size;
        let end = (r.offset + r.length)
            .div_ceil(block_size)
            .saturating_mul(block_size)
            .min(disk_size);
        match spans.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => spans.push(Span { start, end }),
        }
    }
    spans
}

impl Bmap {
    fn blocks(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.block_size)
    }

    /// Blocks the bmap maps.
    pub fn mapped_blocks(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(s, _)| self.blocks(s.end) - s.start / self.block_size)
            .sum()
    }

    /// The bmap file, format 2.0, with `BmapFileChecksum` the SHA-256 of
    /// the file as it reads with that field's value set to 64 `0`s (the rule
    /// of bmap-tools' `BmapCreate` and `BmapCopy._verify_bmap_checksum`).
    pub fn to_xml(&self) -> Vec<u8> {
        let zeros = "0".repeat(SHA256_HEX);
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 4);
        let written: io::Result<()> = (|| {
            w.write_event(Event::Decl(BytesDecl::new("1.0", None, None)))?;
            w.write_event(Event::Comment(BytesText::new(
                " The mapped blocks of a kiln image, for bmaptool copy. ",
            )))?;
            w.create_element("bmap")
                .with_attribute(("version", BMAP_VERSION))
                .write_inner_content(|w| {
                    let blocks = self.blocks(self.image_size);
                    let text = |w: &mut Writer<Vec<u8>>, name: &str, value: &str| {
                        w.create_element(name)
                            .write_text_content(BytesText::new(value))
                            .map(|_| ())
                    };
                    text(w, "ImageSize", &self.image_size.to_string())?;
                    text(w, "BlockSize", &self.block_size.to_string())?;
                    text(w, "BlocksCount", &blocks.to_string())?;
                    text(w, "MappedBlocksCount", &self.mapped_blocks().to_string())?;
                    text(w, "ChecksumType", "sha256")?;
                    text(w, "BmapFileChecksum", &zeros)?;
                    w.create_element("BlockMap").write_inner_content(|w| {
                        for (span, sha256) in &self.ranges {
                            let first = span.start / self.block_size;
                            let last = self.blocks(span.end) - 1;
                            w.create_element("Range")
                                .with_attribute(("chksum", sha256.as_str()))
                                .write_text_content(BytesText::new(&format!("{first}-{last}")))?;
                        }
                        Ok(())
                    })?;
                    Ok(())
                })?;
            Ok(())
        })();
        written.expect("writing XML into memory cannot fail");
        let mut xml = w.into_inner();
        xml.push(b'\n');
        let field = format!("<BmapFileChecksum>{zeros}</BmapFileChecksum>");
        let at = find(&xml, field.as_bytes()).expect("the checksum field was just written")
            + "<BmapFileChecksum>".len();
        let sum = hex(&Sha256::digest(&xml));
        xml[at..at + SHA256_HEX].copy_from_slice(sum.as_bytes());
        xml
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts `buf`, the disk's bytes from offset `pos`, at the edges of `spans`
/// (sorted, disjoint), and hands each piece to `f` with the index of the
/// span it lies in (and whether it ends that span), or `None` between
/// spans. `next` is the first span not yet ended; it carries over from one
/// buffer to the next.
fn split<'b>(
    spans: &[Span],
    next: &mut usize,
    pos: u64,
    buf: &'b [u8],
    mut f: impl FnMut(u64, &'b [u8], Option<(usize, bool)>) -> Result<()>,
) -> Result<()> {
    let mut i = 0usize;
    while i < buf.len() {
        let at = pos + i as u64;
        let left = (buf.len() - i) as u64;
        match spans.get(*next) {
            Some(s) if at >= s.start => {
                let k = (s.end - at).min(left) as usize;
                let ends = at + k as u64 == s.end;
                f(at, &buf[i..i + k], Some((*next, ends)))?;
                if ends {
                    *next += 1;
                }
                i += k;
            }
            s => {
                let k = s.map_or(left, |s| (s.start - at).min(left)) as usize;
                f(at, &buf[i..i + k], None)?;
                i += k;
            }
        }
    }
    Ok(())
}

/// A write to the copy failed: the reader that copies says so through the
/// decompressor as this error, so it is not taken for a bad image.
#[derive(Debug)]
struct CopyFailed(String);

impl std::fmt::Display for CopyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CopyFailed {}

/// Copies what is read through it into `copy`, if there is one.
struct Tee<R> {
    inner: R,
    copy: Option<File>,
    path: PathBuf,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = &mut self.copy {
            copy.write_all(&buf[..n]).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    CopyFailed(format!("writing {}: {e}", self.path.display())),
                )
            })?;
        }
        Ok(n)
    }
}

/// Bytes done of a total on stderr: one line redrawn on a terminal, a line
/// every few seconds otherwise.
struct Progress {
    what: &'static str,
    total: u64,
    started: Instant,
    shown: Instant,
    tty: bool,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            what,
            total,
            started: now,
            shown: now,
            tty: io::stderr().is_terminal(),
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{}: {} of {} ({:.0}%), {}/s",
            self.what,
            human_bytes(done),
            human_bytes(self.total),
            done as f64 * 100.0 / self.total.max(1) as f64,
            human_bytes((done as f64 / secs) as u64)
        )
    }

    fn update(&mut self, done: u64) {
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        if self.shown.elapsed() >= every {
            self.shown = Instant::now();
            if self.tty {
                eprint!("\r\x1b[K{}", self.line(done));
            } else {
                eprintln!("{}", self.line(done));
            }
        }
    }

    fn finish(&self, done: u64) {
        let lead = if self.tty { "\r\x1b[K" } else { "" };
        eprintln!(
            "{lead}{} in {:.1} s",
            self.line(done),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// An output file under a temporary name in the output directory, removed
/// on drop unless [`Output::commit`] renamed it to its real name.
struct Output {
    tmp: PathBuf,
    path: PathBuf,
    keep: bool,
}

impl Output {
    fn new(path: PathBuf) -> Self {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        Output {
            tmp,
            path,
            keep: false,
        }
    }

    fn create(&self) -> Result<File> {
        File::create(&self.tmp).with_context(|| format!("creating {}", self.tmp.display()))
    }

    fn commit(&mut self) -> Result<()> {
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", self.tmp.display()))?;
        fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_file(&self.tmp) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", self.tmp.display());
                }
            }
        }
    }
}

/// A published image in the spool.
struct Image {
    dir: PathBuf,
    file: PathBuf,
    manifest: ImageManifest,
}

impl Image {
    fn open(spool: &LocalSpool, id: &str) -> Result<Image> {
        check_job_id(id).map_err(|e| anyhow::anyhow!("image id {e}"))?;
        let dir = spool.path(&image_dir(id));
        let record = dir.join(PUBLISHED);
        let text = match fs::read_to_string(&record) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{id} is not a published image: {} does not exist (`kiln-master list` shows the jobs that are done)",
                record.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", record.display())),
        };
        let published =
            Published::parse(&text).with_context(|| format!("parsing {}", record.display()))?;
        let mpath = dir.join(MANIFEST);
        let text =
            fs::read_to_string(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
        // What goes to other tools is what this master signed.
        let sig_path = dir.join(SIGNATURE);
        let sig = fs::read_to_string(&sig_path)
            .with_context(|| format!("reading {}", sig_path.display()))?;
        let signers = kiln_spool::master::provenance::master_signers(spool)?;
        signers.verify(text.as_bytes(), &sig).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} ({}); `kiln-master verify {id}` says more",
                mpath.display(),
                sig_path.display()
            )
        })?;
        let manifest =
            ImageManifest::parse(&text).with_context(|| format!("parsing {}", mpath.display()))?;
        check_ranges(&manifest).map_err(|e| anyhow::anyhow!("{}: {e}", mpath.display()))?;
        ensure!(
            manifest.format == "raw.zst",
            "{}: format is {:?}, export reads raw.zst",
            mpath.display(),
            manifest.format
        );
        ensure!(
            published.image_blake3 == manifest.image_blake3,
            "{} says the image's BLAKE3 is {}, {} says {}",
            record.display(),
            published.image_blake3,
            mpath.display(),
            manifest.image_blake3
        );
        Ok(Image {
            file: dir.join(IMAGE_FILE),
            dir,
            manifest,
        })
    }
}

/// What one pass over the image feeds.
struct Sinks {
    /// The compressed file, copied as read.
    copy: Option<File>,
    /// The raw disk, written sparse: only the bmap spans.
    raw: Option<File>,
}

/// Reads the image once, checks it against its manifest and feeds `sinks`;
/// returns the SHA-256 of each of `spans`.
/// `stop` (Ctrl-C) ends the pass early with an error, which leaves the
/// outputs to be removed.
fn stream(
    image: &Image,
    spans: &[Span],
    copy_path: &Path,
    sinks: Sinks,
    stop: &AtomicBool,
) -> Result<Vec<String>> {
    let m = &image.manifest;
    let shown = image.file.display();
    let f = File::open(&image.file).with_context(|| format!("opening {shown}"))?;
    let mut hr = HashReader::new(Tee {
        inner: BufReader::with_capacity(1 << 20, f),
        copy: sinks.copy,
        path: copy_path.to_path_buf(),
    });
    if let Some(raw) = &sinks.raw {
        raw.set_len(m.disk_size)
            .context("sizing the raw disk file")?;
    }
    let ranges: Vec<Span> = m
        .ranges
        .iter()
        .map(|r| Span {
            start: r.offset,
            end: r.offset + r.length,
        })
        .collect();
    let mut sums = Vec::with_capacity(spans.len());
    let pass = (|| -> Result<()> {
        let mut raw = zstd::stream::read::Decoder::new(&mut hr)
            .with_context(|| format!("starting zstd on {shown}"))?;
        let mut buf = vec![0u8; BUFFER];
        let (mut pos, mut next_range, mut next_span) = (0u64, 0usize, 0usize);
        let mut blake3 = blake3::Hasher::new();
        let mut sha = Sha256::new();
        let mut progress = Progress::new("export: reading the image", m.disk_size);
        loop {
            if stop.load(Ordering::SeqCst) {
                eprintln!();
                bail!("interrupted; nothing was exported");
            }
            let n = match raw.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.get_ref().is_some_and(|r| r.is::<CopyFailed>()) => {
                    let copy = e.into_inner().and_then(|b| b.downcast::<CopyFailed>().ok());
                    return Err(anyhow::Error::new(*copy.expect("checked above")));
                }
                Err(e) => bail!(
                    "{shown} does not decompress after byte {pos} of the disk: {e}; nothing was exported"
                ),
            };
            ensure!(
                pos + n as u64 <= m.disk_size,
                "{shown} decompresses to more than the {} bytes manifest.toml gives the disk",
                m.disk_size
            );
            split(
                &ranges,
                &mut next_range,
                pos,
                &buf[..n],
                |at, bytes, inside| {
                    match inside {
                        Some((i, ends)) => {
                            blake3.update(bytes);
                            if ends {
                                let got = blake3.finalize().to_hex().to_string();
                                blake3.reset();
                                let r = &m.ranges[i];
                                ensure!(
                                got == r.blake3,
                                "{shown}: data range {i} (bytes {}..{}) has BLAKE3 {got}, {} says {}; nothing was exported",
                                r.offset,
                                r.offset + r.length,
                                MANIFEST,
                                r.blake3
                            );
                            }
                        }
                        None => {
                            if let Some(z) = bytes.iter().position(|&b| b != 0) {
                                bail!(
                                "{shown}: byte {} of the disk is outside every data range of {MANIFEST} but is not zero; nothing was exported",
                                at + z as u64
                            );
                            }
                        }
                    }
                    Ok(())
                },
            )?;
            split(
                spans,
                &mut next_span,
                pos,
                &buf[..n],
                |at, bytes, inside| {
                    if let Some((_, ends)) = inside {
                        sha.update(bytes);
                        if ends {
                            sums.push(hex(&sha.finalize_reset()));
                        }
                        if let Some(raw) = &sinks.raw {
                            raw.write_all_at(bytes, at)
                                .context("writing the raw disk file")?;
                        }
                    }
                    Ok(())
                },
            )?;
            pos += n as u64;
            progress.update(pos);
        }
        progress.finish(pos);
        ensure!(
            pos == m.disk_size,
            "{shown} decompresses to {pos} bytes, {MANIFEST} says the disk has {}",
            m.disk_size
        );
        Ok(())
    })();
    if pass.as_ref().is_err_and(|e| e.is::<CopyFailed>()) || stop.load(Ordering::SeqCst) {
        return pass.map(|()| sums);
    }
    // zstd may stop before the file's end; what follows still counts. A
    // file that is not the one published is named as that, whatever else
    // went wrong reading it.
    io::copy(&mut hr, &mut io::sink()).with_context(|| format!("reading {shown}"))?;
    let got = hr.digest();
    ensure!(
        got.size == m.image_size && got.blake3 == m.image_blake3,
        "{shown} has {} bytes with BLAKE3 {}, {} says {} bytes with BLAKE3 {}; nothing was exported",
        got.size,
        got.blake3,
        image.dir.join(MANIFEST).display(),
        m.image_size,
        m.image_blake3
    );
    pass.map(|()| sums)
}

/// `program`'s path in `$PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `qemu-img convert` of the sparse raw disk to qcow2, its progress on our
/// stderr; the error holds the tail of its stderr.
fn convert_qcow2(qemu_img: &Path, raw: &Path, out: &Path) -> Result<()> {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["convert", "-p", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out);
    let argv = crate::command::argv(&cmd);
    tracing::info!(%argv, "running");
    eprintln!("export: {argv}");
    let progress_to = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("running {argv}"))?;
    let output = cmd
        .stdin(Stdio::null())
        .stdout(progress_to)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {argv}"))?;
    eprintln!();
    if !output.status.success() {
        bail!(
            "{argv} failed ({}): {}",
            output.status,
            crate::command::tail(&String::from_utf8_lossy(&output.stderr))
        );
    }
    Ok(())
}

pub fn run(spool: &LocalSpool, args: &ExportArgs) -> Result<()> {
    let image = Image::open(spool, &args.id)?;
    let m = &image.manifest;
    let qemu_img = match args.qcow2 {
        true => Some(find_program("qemu-img").context(
            "--qcow2 runs qemu-img, which is not in PATH (Debian: apt-get install qemu-utils)",
        )?),
        false => None,
    };

    let id = &args.id;
    let out = &args.out;
    let bmap_image = args.bmap.then(|| match args.raw {
        true => out.join(format!("{id}.img")),
        false => out.join(format!("{id}.img.zst")),
    });
    let bmap_file = args.bmap.then(|| out.join(format!("{id}.img.bmap")));
    let qcow2 = args.qcow2.then(|| out.join(format!("{id}.qcow2")));
    let finals: Vec<&PathBuf> = [&bmap_image, &bmap_file, &qcow2]
        .into_iter()
        .flatten()
        .collect();
    if !args.force {
        for p in &finals {
            ensure!(
                p.symlink_metadata().is_err(),
                "{} already exists; --force replaces it",
                p.display()
            );
        }
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let mut copy = (args.bmap && !args.raw).then(|| Output::new(bmap_image.clone().unwrap()));
    let mut raw = if args.raw {
        Some(Output::new(bmap_image.clone().unwrap()))
    } else if args.qcow2 {
        Some(Output::new(out.join(format!("{id}.raw"))))
    } else {
        None
    };
    let sinks = Sinks {
        copy: copy.as_ref().map(Output::create).transpose()?,
        raw: raw.as_ref().map(Output::create).transpose()?,
    };
    let spans = bmap_spans(&m.ranges, m.block_size, m.disk_size);
    let copy_path = copy.as_ref().map_or_else(PathBuf::new, |c| c.tmp.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let sums = stream(&image, &spans, &copy_path, sinks, &stop)?;

    let mut lines = Vec::new();
    let mut bmap_out = None;
    if let Some(path) = &bmap_file {
        let bmap = Bmap {
            image_size: m.disk_size,
            block_size: m.block_size,
            ranges: spans.iter().copied().zip(sums).collect(),
        };
        let o = Output::new(path.clone());
        let mut f = o.create()?;
        f.write_all(&bmap.to_xml())
            .with_context(|| format!("writing {}", o.tmp.display()))?;
        drop(f);
        bmap_out = Some((o, bmap));
    }
    let mut qcow2_out = None;
    if let (Some(path), Some(qemu_img), Some(raw)) = (&qcow2, &qemu_img, &raw) {
        let o = Output::new(path.clone());
        convert_qcow2(qemu_img, &raw.tmp, &o.tmp)?;
        qcow2_out = Some(o);
    }

    // Everything is checked and written: give the files their names.
    if let Some(c) = &mut copy {
        c.commit()?;
        lines.push(format!(
            "  {}  the image as published, zstd ({})",
            c.path.display(),
            human_bytes(m.image_size)
        ));
    }
    if args.raw {
        if let Some(r) = &mut raw {
            r.commit()?;
            lines.push(format!(
                "  {}  the raw disk, sparse ({}, {} of data)",
                r.path.display(),
                human_bytes(m.disk_size),
                human_bytes(m.data_bytes())
            ));
        }
    }
    if let Some((o, bmap)) = &mut bmap_out {
        o.commit()?;
        lines.push(format!(
            "  {}  bmap {BMAP_VERSION}: {} ranges, {} of {} blocks of {} bytes mapped, SHA-256 each",
            o.path.display(),
            bmap.ranges.len(),
            bmap.mapped_blocks(),
            bmap.blocks(bmap.image_size),
            bmap.block_size
        ));
    }
    if let Some(o) = &mut qcow2_out {
        o.commit()?;
        lines.push(format!("  {}  qcow2", o.path.display()));
    }
    File::open(out)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", out.display()))?;

    let mut stdout = io::stdout().lock();
    let mut say = || -> io::Result<()> {
        writeln!(
            stdout,
            "exported {id} ({} disk, {} of data in {} ranges), checked against {}:",
            human_bytes(m.disk_size),
            human_bytes(m.data_bytes()),
            m.ranges.len(),
            image.dir.join(MANIFEST).display()
        )?;
        for l in &lines {
            writeln!(stdout, "{l}")?;
        }
        if let Some(img) = &bmap_image {
            writeln!(
                stdout,
                "write it to a disk:  bmaptool copy {} /dev/sdX",
                img.display()
            )?;
        }
        if let Some(q) = &qcow2 {
            writeln!(
                stdout,
                "boot it in a VM:     qemu-system-x86_64 -m 2G -drive file={},format=qcow2  (add -bios /usr/share/ovmf/OVMF.fd for UEFI)",
                q.display()
            )?;
        }
        Ok(())
    };
    say().context("writing to stdout")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(offset: u64, length: u64) -> DataRange {
        DataRange {
            offset,
            length,
            blake3: String::new(),
        }
    }

    #[test]
    fn spans_round_out_to_blocks_and_merge_when_they_touch() {
        let ranges = [
            range(0, 512),
            range(4096 + 100, 10),
            range(8192, 4096),
            range(40_960, 1),
            range(100_000, 10),
        ];
        let spans = bmap_spans(&ranges, 4096, 100_005);
        assert_eq!(
            spans,
            [
                Span {
                    start: 0,
                    end: 12_288
                },
                Span {
                    start: 40_960,
                    end: 45_056
                },
                // The last block is cut where the image ends.
                Span {
                    start: 98_304,
                    end: 100_005
                },
            ]
        );
    }

    #[test]
    fn overlapping_or_unordered_ranges_are_refused() {
        let mut m: ImageManifest = ImageManifest::parse(
            r#"format = "raw.zst"
job = "a"
disk_size = 65536
block_size = 4096
bytes_read = 0
image_size = 0
image_blake3 = ""
started = "2026-12-02T00:00:00Z"
finished = "2026-12-02T00:00:00Z"
"#,
        )
        .unwrap();
        m.ranges = vec![range(0, 8192), range(4096, 10)];
        let e = check_ranges(&m).unwrap_err();
        assert!(
            e.contains("range 1 starts at byte 4096, before range 0"),
            "{e}"
        );
        m.ranges = vec![range(65_000, 1000)];
        let e = check_ranges(&m).unwrap_err();
        assert!(e.contains("ends past the disk's 65536 bytes"), "{e}");
        m.ranges = vec![range(0, 4096)];
        m.block_size = 1000;
        assert!(check_ranges(&m).unwrap_err().contains("power of two"));
    }

    #[test]
    fn the_bmap_checksum_covers_the_file_with_the_field_zeroed() {
        let bmap = Bmap {
            image_size: 1 << 20,
            block_size: 4096,
            ranges: vec![
                (
                    Span {
                        start: 0,
                        end: 8192,
                    },
                    "a".repeat(64),
                ),
                (
                    Span {
                        start: 65_536,
                        end: 69_632,
                    },
                    "b".repeat(64),
                ),
            ],
        };
        let xml = String::from_utf8(bmap.to_xml()).unwrap();
        assert!(xml.contains("<bmap version=\"2.0\">"), "{xml}");
        assert!(xml.contains("<BlocksCount>256</BlocksCount>"), "{xml}");
        assert!(
            xml.contains("<MappedBlocksCount>3</MappedBlocksCount>"),
            "{xml}"
        );
        assert!(xml.contains("<ChecksumType>sha256</ChecksumType>"), "{xml}");
        assert!(xml.contains(&format!("<Range chksum=\"{}\">0-1</Range>", "a".repeat(64))));
        assert!(xml.contains(&format!(
            "<Range chksum=\"{}\">16-16</Range>",
            "b".repeat(64)
        )));
        let start = xml.find("<BmapFileChecksum>").unwrap() + "<BmapFileChecksum>".len();
        let sum = xml[start..start + 64].to_string();
        let zeroed = xml.replacen(&sum, &"0".repeat(64), 1);
        assert_eq!(hex(&Sha256::digest(zeroed.as_bytes())), sum);
    }

    #[test]
    fn split_cuts_buffers_at_span_edges() {
        let spans = [Span { start: 2, end: 5 }, Span { start: 7, end: 8 }];
        let mut next = 0;
        let mut pieces = Vec::new();
        for (pos, chunk) in [(0u64, &[0u8, 0, 1, 2][..]), (4, &[3, 0, 0, 4, 0, 0][..])] {
            split(&spans, &mut next, pos, chunk, |at, b, inside| {
                pieces.push((at, b.to_vec(), inside));
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(
            pieces,
            [
                (0, vec![0, 0], None),
                (2, vec![1, 2], Some((0, false))),
                (4, vec![3], Some((0, true))),
                (5, vec![0, 0], None),
                (7, vec![4], Some((1, true))),
                (8, vec![0, 0], None),
            ]
        );
        assert_eq!(next, 2);
    }
}
