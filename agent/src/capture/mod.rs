//! Block-level capture: reads the blocks in use (see [`map`]), drops
//! all-zero blocks, and writes one zstd stream that decompresses to the raw
//! disk, hashing each data range; the stream goes into an [`ImageSink`]: a
//! file ([`FileSink`]) or the upload ([`ChunkSink`], see [`window`]).
//!
//! Data goes through zstd's multithreaded encoder with fixed parameters
//! ([`encoder`]): its output does not depend on the number of workers, so
//! the same disk always captures to the same bytes, which lets an agent
//! that restarts mid-upload capture again and skip the chunks the server
//! holds. A long run of zeros (a free area, or zero blocks read) ends the
//! current zstd frame and is written as a frame of RLE blocks: four bytes
//! per 128 KiB, so a mostly empty disk costs nothing to compress. A zstd
//! file may hold any number of frames; `zstd -d` and every decoder
//! concatenate them.
//!
//! Memory stays bounded whatever the disk: a few read buffers, zstd's
//! workers (fixed job size), and whatever the sink holds.

pub mod ext4;
pub mod fat;
pub mod map;
pub mod window;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel};

use kiln_spool::agent::uploader::ChunkSink;
use kiln_spool::manifest::DataRange;
use kiln_spool::stream::{Digest, HashWriter};
use zstd::stream::raw::{Encoder as RawEncoder, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe::CParameter;

use crate::error::{Context, Error, Result};
use crate::progress::{Event, Phase, Throttle};
use map::RegionKind;

/// Granularity of zero detection and of the data map.
pub const BLOCK: u64 = 4096;
/// Bytes read from the disk at once.
const CHUNK: u64 = 4 << 20;
/// Read buffers: one being read, the others queued for compression.
const READ_BUFFERS: usize = 3;
/// Data ranges closer than this are merged (the zeros between them hashed
/// in), which keeps the manifest short on fragmented filesystems.
const MERGE_GAP: u64 = 1 << 20;
/// Zero runs at least this long become an RLE frame instead of encoder input.
const ZERO_FRAME_MIN: u64 = 1 << 20;
/// Input of one zstd worker job. Fixed, because the job size shapes the
/// output; small, because each worker holds about three jobs' worth.
pub const ZSTD_JOB: u32 = 2 << 20;
/// Most zstd workers a capture starts.
pub const MAX_WORKERS: u32 = 8;
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
    /// zstd worker threads; 0 picks the number of CPUs (at most
    /// [`MAX_WORKERS`]). The image's bytes are the same for any number.
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

impl CaptureOptions {
    /// The zstd workers this capture starts.
    pub fn workers(&self) -> u32 {
        if self.threads == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .min(MAX_WORKERS)
        } else {
            self.threads
        }
    }
}

/// Where a capture's compressed stream goes.
pub trait ImageSink: Write {
    /// Makes every byte durable (or handed over) and returns the image's
    /// size and BLAKE3.
    fn finish(&mut self) -> io::Result<Digest>;
    /// What the sink is, for errors: "writing {what}".
    fn what(&self) -> String;
}

/// The image as a file, hashed as it is written; created at the first
/// byte, so that a build that fails before its capture leaves no file.
pub struct FileSink {
    out: Option<HashWriter<BufWriter<File>>>,
    path: PathBuf,
}

impl FileSink {
    pub fn new(path: &Path) -> FileSink {
        FileSink {
            out: None,
            path: path.to_path_buf(),
        }
    }

    fn file(&mut self) -> io::Result<&mut HashWriter<BufWriter<File>>> {
        if self.out.is_none() {
            let f = File::create(&self.path)?;
            self.out = Some(HashWriter::new(BufWriter::with_capacity(1 << 20, f)));
        }
        Ok(self.out.as_mut().expect("just created"))
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file()?.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl ImageSink for FileSink {
    fn finish(&mut self) -> io::Result<Digest> {
        let out = self.file()?;
        out.flush()?;
        out.get_ref().get_ref().sync_all()?;
        Ok(out.digest())
    }
    fn what(&self) -> String {
        self.path.display().to_string()
    }
}

impl ImageSink for ChunkSink {
    fn finish(&mut self) -> io::Result<Digest> {
        ChunkSink::finish(self)
    }
    fn what(&self) -> String {
        "the image to the upload".into()
    }
}

/// The zstd encoder every capture uses: `level`, [`ZSTD_JOB`]-sized jobs,
/// and for the levels above 3 a window and tables capped so that a worker
/// stays near 10 MiB. At least one worker, because zstd's single-threaded
/// mode writes other bytes than its workers do.
fn encoder(level: i32, workers: u32) -> io::Result<RawEncoder<'static>> {
    let mut enc = RawEncoder::new(level)?;
    enc.set_parameter(CParameter::NbWorkers(workers.max(1)))?;
    enc.set_parameter(CParameter::JobSize(ZSTD_JOB))?;
    if level > 3 {
        enc.set_parameter(CParameter::WindowLog(21))?;
        enc.set_parameter(CParameter::HashLog(19))?;
        enc.set_parameter(CParameter::ChainLog(19))?;
    }
    Ok(enc)
}

/// A sequence of zstd frames: encoder frames for data, RLE frames for zeros.
struct FrameWriter<'s> {
    enc: RawEncoder<'static>,
    out: &'s mut dyn ImageSink,
    buf: Vec<u8>,
    in_frame: bool,
}

impl FrameWriter<'_> {
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
        // Every job is handed to the workers before the frame ends. Without
        // this, a last job still waiting for a free worker is marked last
        // itself, while one already started is followed by an empty last
        // block: three bytes that would depend on timing.
        loop {
            let mut output = OutBuffer::around(&mut self.buf[..]);
            let remaining = self.enc.flush(&mut output)?;
            let n = output.pos();
            self.out.write_all(&self.buf[..n])?;
            if remaining == 0 {
                break;
            }
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
            return write_rle_zero_frame(&mut *self.out, n);
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
/// no content size, a 128 KiB window, each block a 3-byte header and one
/// byte. Written a few thousand blocks at a time, so that a terabyte of
/// zeros costs no more memory than a megabyte.
pub fn write_rle_zero_frame(out: &mut dyn Write, n: u64) -> io::Result<()> {
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
        if f.len() >= 64 << 10 {
            out.write_all(&f)?;
            f.clear();
        }
    }
    out.write_all(&f)
}

/// The RLE zero frame of [`write_rle_zero_frame`] as bytes.
pub fn rle_zero_frame(n: u64) -> Vec<u8> {
    let mut f = Vec::new();
    write_rle_zero_frame(&mut f, n).expect("writing to a Vec");
    f
}

/// Builds the data ranges and their hashes as data passes in disk order.
struct Ranges {
    done: Vec<DataRange>,
    current: Option<(u64, u64, HashWriter<io::Sink>)>,
}

impl Ranges {
    fn data(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if let Some((_, cur_end, h)) = self.current.as_mut() {
            if offset - *cur_end <= MERGE_GAP {
                let mut gap = offset - *cur_end;
                while gap > 0 {
                    let k = gap.min(ZEROS.len() as u64) as usize;
                    let _ = h.write_all(&ZEROS[..k]);
                    gap -= k as u64;
                }
                let _ = h.write_all(bytes);
                *cur_end = end;
                return;
            }
        }
        self.close();
        let mut h = HashWriter::new(io::sink());
        let _ = h.write_all(bytes);
        self.current = Some((offset, end, h));
    }

    fn close(&mut self) {
        if let Some((start, end, h)) = self.current.take() {
            self.done.push(DataRange {
                offset: start,
                length: end - start,
                blake3: h.digest().blake3,
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
    /// `.1[..]` read at offset `.0`.
    Data(u64, Vec<u8>),
    Free(u64),
}

/// Captures `disk` (a block device or a file) into the file `out`.
pub fn capture(
    disk: &Path,
    out: &Path,
    opts: &CaptureOptions,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<CaptureResult> {
    capture_to(disk, &mut FileSink::new(out), opts, events, abort)
}

/// Captures `disk` (a block device or a file) into `sink`, and finishes it.
pub fn capture_to(
    disk: &Path,
    sink: &mut dyn ImageSink,
    opts: &CaptureOptions,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<CaptureResult> {
    let file = File::open(disk).ctx(|| format!("opening {} to capture it", disk.display()))?;
    let size = crate::disk::size_of(&file, disk)?;
    let sector = crate::disk::sector_size(&file);
    let dmap = map::map_disk(&file, size, sector)
        .ctx(|| format!("reading the filesystems of {}", disk.display()))?;
    let what = sink.what();
    let wr = |e: std::io::Error| Error::Io {
        what: format!("writing {what}"),
        source: e,
    };
    let enc = encoder(opts.level, opts.workers()).ctx(|| "starting zstd".to_string())?;
    let mut w = FrameWriter {
        enc,
        out: sink,
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
    let reader_result = std::thread::scope(|s| -> Result<u64> {
        let (tx, rx) = sync_channel::<std::io::Result<Piece>>(READ_BUFFERS);
        // Read buffers go round: a new 4 MiB allocation per read would
        // fault its pages in every time.
        let (free_tx, free) = channel::<Vec<u8>>();
        for _ in 0..READ_BUFFERS {
            let _ = free_tx.send(Vec::with_capacity(CHUNK as usize));
        }
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
                            let Ok(mut buf) = free.recv() else {
                                return read;
                            };
                            buf.resize(n, 0);
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
                    let _ = free_tx.send(buf);
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
    let image = w.out.finish().map_err(wr)?;
    Ok(CaptureResult {
        disk_size: size,
        block_size: BLOCK,
        bytes_read,
        image_size: image.size,
        image_blake3: image.blake3,
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

    /// A disk file with data, zeros and text, and no partition table.
    fn sample_disk(dir: &Path) -> PathBuf {
        let mut disk = Vec::with_capacity(24 << 20);
        let mut seed = 0x2545f4914f6cdd1du64;
        for _ in 0..(6 << 20) / 8 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            disk.extend_from_slice(&seed.to_le_bytes());
        }
        disk.resize(10 << 20, 0);
        let mut n = 0u64;
        while disk.len() < 20 << 20 {
            disk.extend_from_slice(format!("line {n} of a log file\n").as_bytes());
            n += 1;
        }
        disk.resize(24 << 20, 0);
        let path = dir.join("disk.img");
        std::fs::write(&path, &disk).unwrap();
        path
    }

    #[test]
    fn the_same_disk_captures_to_the_same_bytes_with_any_number_of_workers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = sample_disk(dir.path());
        let abort = AtomicBool::new(false);
        let mut images = Vec::new();
        for (i, threads) in [1, 2, 3].into_iter().enumerate() {
            let out = dir.path().join(format!("{i}.raw.zst"));
            let opts = CaptureOptions { level: 3, threads };
            let r = capture(&disk, &out, &opts, &mut |_| {}, &abort).unwrap();
            let bytes = std::fs::read(&out).unwrap();
            assert_eq!(r.image_size, bytes.len() as u64);
            assert_eq!(r.image_blake3, blake3::hash(&bytes).to_hex().to_string());
            images.push(bytes);
        }
        assert!(images[1] == images[0] && images[2] == images[0]);
        let raw = zstd::decode_all(&images[0][..]).unwrap();
        assert!(raw == std::fs::read(&disk).unwrap());
    }

    #[test]
    fn a_capture_streams_into_chunks_that_join_to_the_file_capture() {
        use kiln_spool::agent::uploader::{upload_stream, ChunkPlan, StreamOptions};
        let dir = tempfile::tempdir().unwrap();
        let disk = sample_disk(dir.path());
        let abort = AtomicBool::new(false);
        let opts = CaptureOptions::default();
        let file = dir.path().join("file.raw.zst");
        let by_file = capture(&disk, &file, &opts, &mut |_| {}, &abort).unwrap();

        let spool = kiln_spool::LocalSpool::new(dir.path().join("spool"));
        std::fs::create_dir(spool.root()).unwrap();
        kiln_spool::master::init(&spool).unwrap();
        let job = "id = \"j1\"\npriority = 1\ntime_limit = \"1h\"\n[disk]\n[[disk.partitions]]\n\
                   label = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";
        let t0 = kiln_spool::time::Timestamp(1_900_000_000);
        kiln_spool::master::add_job(&spool, job, Path::new("j1.toml"), t0).unwrap();
        let lease = kiln_spool::agent::claim::claim_next(&spool, "a1", t0)
            .unwrap()
            .unwrap();
        let progress = |_: &kiln_spool::agent::uploader::UploadProgress| {};
        let stream = StreamOptions {
            plan: ChunkPlan::new(1 << 20, 4 << 20),
            job_log: None,
            resume: None,
            progress: &progress,
        };
        let report = upload_stream(&spool, &lease, &stream, |sink| {
            let r = capture_to(&disk, sink, &opts, &mut |_| {}, &abort)?;
            Ok::<_, Error>(kiln_spool::manifest::ImageManifest {
                format: "raw.zst".into(),
                job: "j1".into(),
                job_blake3: blake3::hash(job.as_bytes()).to_hex().to_string(),
                agent: "a1".into(),
                disk_size: r.disk_size,
                block_size: r.block_size,
                bytes_read: r.bytes_read,
                image_size: r.image_size,
                image_blake3: r.image_blake3,
                payloads: vec![],
                started: t0,
                finished: t0,
                phases: vec![],
                ranges: r.ranges,
                generalized: Vec::new(),
                provenance: None,
            })
        })
        .unwrap();
        assert_eq!(report.image_blake3, by_file.image_blake3);
        assert!(report.chunks > 1, "{report:?}");
        let mut joined = Vec::new();
        for i in 0..report.chunks {
            let chunk = spool.path(&format!(
                "{}/{}",
                report.dir,
                kiln_spool::upload::chunk_name(i)
            ));
            joined.extend(std::fs::read(chunk).unwrap());
        }
        assert!(joined == std::fs::read(&file).unwrap());
    }
}
