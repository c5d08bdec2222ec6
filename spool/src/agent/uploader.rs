//! The agent's side of an upload: the compressed image, cut in fixed-size
//! chunks, into `incoming/<job>/<token>/` (layout in [`crate::upload`]),
//! resumable, with the manifest written last. Generic over [`SpoolFs`], so
//! the same code runs over SFTP and on a local spool.
//!
//! The image streams through three stages with bounded buffers between
//! them: whoever produces it (the capture, or a file) fills chunk buffers
//! through a [`ChunkSink`]; a hashing thread computes each chunk's BLAKE3
//! and the image's with [`HashWriter`]; the sending stage writes each chunk
//! to the server and only then hands its buffer back. A chunk is kept until
//! the server holds it, so a cut link is resumed where the server's chunks
//! end without producing the image again; the buffers are the upload's
//! whole memory ([`ChunkPlan`]).
//!
//! A chunk appears under its final name only once it is whole (it is
//! written under a temporary name, flushed, then renamed without
//! clobbering). A chunk found on the server when an upload starts or
//! resumes is read back and hashed: it is skipped only when it matches the
//! chunk the stream produced, and replaced otherwise.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::agent::claim::{check_lease, LeaseCheck};
use crate::error::SpoolError;
use crate::lease::{check_token, Lease};
use crate::manifest::ImageManifest;
use crate::names::check_job_id;
use crate::spool::{incoming_dir, temp_name, SpoolFs};
use crate::stream::{digest, Digest, HashWriter, Limit};
use crate::upload::{chunk_name, Chunk, ChunkList, CHUNKS, JOB_LOG, MANIFEST};

/// The largest chunk: few enough chunks for a listing, small enough to
/// resend after a cut. The buffers a window allows cut it further.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// Bytes of chunk buffers an upload from a file holds.
pub const FILE_WINDOW: u64 = 32 << 20;
/// Bytes handed to the server's writer at once: a multiple of libssh2's
/// 30,000-byte SFTP write, so that it pipelines the writes.
pub const BUFFER: usize = 128 * 30_000;
/// Chunk buffers of an upload: one being filled, one being hashed, one
/// being sent, one spare so that none of them waits for another.
const BUFFERS: u64 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadOptions {
    /// At most this; see [`ChunkPlan`].
    pub chunk_size: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// How an upload's buffer bytes are cut: `buffers` chunk buffers of
/// `chunk_size` bytes, together at most the bytes given (and at least two
/// chunks of one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    pub chunk_size: u64,
    pub buffers: usize,
}

impl ChunkPlan {
    /// Chunks of at most `chunk_size`, four buffers when they fit in `bytes`.
    pub fn new(chunk_size: u64, bytes: u64) -> ChunkPlan {
        let chunk = chunk_size.min(bytes / BUFFERS).max(1);
        let buffers = (bytes / chunk).clamp(2, BUFFERS);
        ChunkPlan {
            chunk_size: chunk,
            buffers: buffers as usize,
        }
    }

    /// The bytes the buffers hold when full.
    pub fn bytes(&self) -> u64 {
        self.chunk_size * self.buffers as u64
    }
}

/// Where an upload is; handed to the progress callback after every buffer
/// written and after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadProgress {
    /// The chunk being worked on, from 0.
    pub chunk: usize,
    /// Chunks and bytes of the image: while a stream is still being
    /// produced, those handed over so far.
    pub chunks: usize,
    /// Image bytes dealt with: sent, or found on the server already.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Chunks sent and chunks skipped (already whole on the server) so far.
    pub sent: usize,
    pub skipped: usize,
}

impl UploadProgress {
    pub fn fraction(&self) -> f32 {
        if self.bytes_total == 0 {
            1.0
        } else {
            (self.bytes_done as f64 / self.bytes_total as f64) as f32
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    /// `incoming/<job>/<token>`
    pub dir: String,
    pub chunks: usize,
    pub sent: usize,
    pub skipped: usize,
    pub bytes_sent: u64,
    pub image_size: u64,
    pub image_blake3: String,
    /// Times the link was opened again after a cut.
    pub resumed: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("the lease on {job} is gone; stopping the upload")]
    LeaseGone { job: String },
    #[error("the lease on {job} now belongs to {by_agent}; stopping the upload")]
    LeaseReplaced { job: String, by_agent: String },
    #[error("{path}: {problem}")]
    Image { path: String, problem: String },
    #[error("lease for {job:?}: {problem}")]
    BadLease { job: String, problem: String },
    #[error("the image stream ended before its end")]
    StreamEnded,
    #[error("stopped during the upload")]
    Aborted,
}

impl UploadError {
    /// True when the agent no longer holds the job and must drop it at once.
    pub fn is_lease_lost(&self) -> bool {
        matches!(
            self,
            UploadError::LeaseGone { .. } | UploadError::LeaseReplaced { .. }
        )
    }

    /// True for what a new session may cure: the link, not the upload.
    fn is_link(&self) -> bool {
        matches!(self, UploadError::Io { .. } | UploadError::Spool(_))
    }
}

/// A streamed upload that failed: in its producer, or in the upload.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    #[error(transparent)]
    Produce(E),
    #[error(transparent)]
    Upload(UploadError),
}

fn io_ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, UploadError> {
    r.map_err(|source| UploadError::Io {
        what: what(),
        source,
    })
}

/// `Ok` while `lease` is still the job's; the error says who took it.
pub(crate) fn ensure_held(fs: &dyn SpoolFs, lease: &Lease) -> Result<(), UploadError> {
    match check_lease(fs, lease)? {
        LeaseCheck::Held => Ok(()),
        LeaseCheck::Gone => Err(UploadError::LeaseGone {
            job: lease.job.clone(),
        }),
        LeaseCheck::Replaced { by_agent } => Err(UploadError::LeaseReplaced {
            job: lease.job.clone(),
            by_agent,
        }),
    }
}

fn check_lease_fields(lease: &Lease) -> Result<(), UploadError> {
    let bad_lease = |problem: String| UploadError::BadLease {
        job: lease.job.clone(),
        problem,
    };
    check_job_id(&lease.job).map_err(|p| bad_lease(format!("job id {p}")))?;
    check_token(&lease.token).map_err(bad_lease)
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped")
}

/// What the producer hands to the hashing thread.
enum Filled {
    Chunk(Vec<u8>),
    /// Every byte was handed over.
    Finish,
}

/// What the hashing thread hands to the sending stage.
enum Hashed {
    Chunk(Vec<u8>, Digest),
    /// The whole image.
    End(Digest),
}

/// The producer's end of an upload: a [`Write`] that fills chunk buffers
/// from the upload's pool and hands each full one on. It blocks while every
/// buffer is in flight, which is what bounds the stream's memory.
pub struct ChunkSink {
    chunk_size: usize,
    buf: Vec<u8>,
    free: mpsc::Receiver<Vec<u8>>,
    full: Option<mpsc::SyncSender<Filled>>,
    image: mpsc::Receiver<Digest>,
    done: Option<Digest>,
}

impl ChunkSink {
    fn take_buffer(&mut self) -> io::Result<()> {
        if self.buf.capacity() == 0 {
            self.buf = self.free.recv().map_err(|_| stopped())?;
            self.buf.clear();
        }
        Ok(())
    }

    fn pass_on(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        match &self.full {
            Some(full) => full.send(Filled::Chunk(buf)).map_err(|_| stopped()),
            None => Err(stopped()),
        }
    }

    /// Reads `r` to its end straight into the chunk buffers.
    pub fn fill_from(&mut self, r: &mut dyn Read) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            self.take_buffer()?;
            let room = (self.chunk_size - self.buf.len()) as u64;
            let n = r.take(room).read_to_end(&mut self.buf)?;
            total += n as u64;
            if self.buf.len() == self.chunk_size {
                self.pass_on()?;
            } else if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Hands over the last bytes and returns the image's size and BLAKE3
    /// once they are hashed. Calling it again returns the same.
    pub fn finish(&mut self) -> io::Result<Digest> {
        if let Some(d) = &self.done {
            return Ok(d.clone());
        }
        if !self.buf.is_empty() {
            self.pass_on()?;
        }
        let full = self.full.take().ok_or_else(stopped)?;
        full.send(Filled::Finish).map_err(|_| stopped())?;
        drop(full);
        let d = self.image.recv().map_err(|_| stopped())?;
        self.done = Some(d.clone());
        Ok(d)
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.done.is_some() {
            return Err(io::Error::other("the image was finished"));
        }
        self.take_buffer()?;
        let n = data.len().min(self.chunk_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.pass_on()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The three stages' channels, made together so that each end goes to the
/// stage that owns it.
struct Pipes {
    sink: ChunkSink,
    full: mpsc::Receiver<Filled>,
    image: mpsc::Sender<Digest>,
    hashed: (mpsc::SyncSender<Hashed>, mpsc::Receiver<Hashed>),
    free: mpsc::Sender<Vec<u8>>,
}

fn pipes(plan: ChunkPlan) -> Pipes {
    let (free, free_rx) = mpsc::channel();
    for _ in 0..plan.buffers {
        let _ = free.send(Vec::with_capacity(plan.chunk_size as usize));
    }
    let (full_tx, full) = mpsc::sync_channel(plan.buffers);
    let (image, image_rx) = mpsc::channel();
    Pipes {
        sink: ChunkSink {
            chunk_size: plan.chunk_size as usize,
            buf: Vec::new(),
            free: free_rx,
            full: Some(full_tx),
            image: image_rx,
            done: None,
        },
        full,
        image,
        hashed: mpsc::sync_channel(plan.buffers),
        free,
    }
}

/// The hashing stage: each chunk's BLAKE3 and the image's, in one pass
/// over each buffer. Stops quietly when either neighbour is gone; without
/// [`Filled::Finish`] the stream ended early and no [`Hashed::End`] is sent.
fn hash_chunks(
    full: mpsc::Receiver<Filled>,
    out: mpsc::SyncSender<Hashed>,
    image: mpsc::Sender<Digest>,
) {
    let mut whole = HashWriter::new(io::sink());
    for filled in full {
        let buf = match filled {
            Filled::Chunk(buf) => buf,
            Filled::Finish => {
                let d = whole.digest();
                let _ = image.send(d.clone());
                let _ = out.send(Hashed::End(d));
                return;
            }
        };
        let mut chunk = HashWriter::new(io::sink());
        // A piece at a time, so that both hashers read it from the cache.
        for piece in buf.chunks(1 << 16) {
            let _ = chunk.write_all(piece);
            let _ = whole.write_all(piece);
        }
        if out.send(Hashed::Chunk(buf, chunk.digest())).is_err() {
            return;
        }
    }
}

/// How a streamed upload opens a new session after a cut.
pub struct Resume<'a> {
    /// A new session to the same spool.
    pub reconnect: &'a (dyn Fn() -> io::Result<Box<dyn SpoolFs>> + Sync),
    /// Cuts in a row (without a chunk sent between them) before giving up.
    pub retries: u32,
    /// The wait before the first new session; it doubles with each cut in
    /// a row, up to 16 times.
    pub wait: Duration,
    /// Raised to stop waiting for the link.
    pub abort: &'a AtomicBool,
    /// Told of each cut and each resume.
    pub say: &'a (dyn Fn(&str) + Sync),
}

/// The sending stage: puts each chunk on the server, then the chunk list,
/// the job log and the manifest; after a cut, a new session when it may.
struct Sender<'a> {
    first: &'a dyn SpoolFs,
    fresh: Option<Box<dyn SpoolFs>>,
    resume: Option<&'a Resume<'a>>,
    lease: &'a Lease,
    dir: String,
    /// Names on the server not yet checked; `None` until listed (again).
    present: Option<HashSet<String>>,
    state: UploadProgress,
    list: ChunkList,
    bytes_sent: u64,
    tries: u32,
    resumed: u32,
    progress: &'a mut dyn FnMut(&UploadProgress),
}

impl<'a> Sender<'a> {
    fn new(
        fs: &'a dyn SpoolFs,
        lease: &'a Lease,
        chunk_size: u64,
        resume: Option<&'a Resume<'a>>,
        progress: &'a mut dyn FnMut(&UploadProgress),
    ) -> Self {
        Sender {
            first: fs,
            fresh: None,
            resume,
            lease,
            dir: incoming_dir(&lease.job, &lease.token),
            present: None,
            state: UploadProgress {
                chunk: 0,
                chunks: 0,
                bytes_done: 0,
                bytes_total: 0,
                sent: 0,
                skipped: 0,
            },
            list: ChunkList {
                chunk_size,
                total_size: 0,
                chunks: Vec::new(),
            },
            bytes_sent: 0,
            tries: 0,
            resumed: 0,
            progress,
        }
    }

    /// Runs `op` on the current session; after a cut, on a new one, until
    /// it succeeds or the retries run out.
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&dyn SpoolFs, &mut Self) -> Result<T, UploadError>,
    ) -> Result<T, UploadError> {
        loop {
            let fresh = self.fresh.take();
            let r = op(fresh.as_deref().unwrap_or(self.first), self);
            self.fresh = fresh;
            match r {
                Ok(t) => return Ok(t),
                Err(e) => self.recover(e)?,
            }
        }
    }

    fn recover(&mut self, e: UploadError) -> Result<(), UploadError> {
        let Some(resume) = self.resume else {
            return Err(e);
        };
        if !e.is_link() || self.tries >= resume.retries {
            return Err(e);
        }
        self.tries += 1;
        let wait = resume.wait * (1 << (self.tries - 1).min(4));
        (resume.say)(&format!(
            "upload interrupted: {}; resuming in {:.1}s (try {} of {})",
            with_sources(&e),
            wait.as_secs_f64(),
            self.tries,
            resume.retries
        ));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if resume.abort.load(Ordering::SeqCst) {
                return Err(UploadError::Aborted);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match (resume.reconnect)() {
            Ok(fs) => {
                self.fresh = Some(fs);
                self.present = None;
                self.resumed += 1;
                (resume.say)(&format!(
                    "upload resumed at chunk {} on a new session",
                    self.state.chunk
                ));
            }
            Err(e) => (resume.say)(&format!(
                "reconnecting for the upload: {}",
                with_sources(&e)
            )),
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), UploadError> {
        self.retrying(|fs, s| {
            ensure_held(fs, s.lease)?;
            io_ctx(fs.mkdir_all(&s.dir), || format!("creating {}", s.dir))
        })
    }

    /// Every chunk the hashing stage hands over, until the image's end.
    fn chunks(
        &mut self,
        hashed: &mpsc::Receiver<Hashed>,
        free: &mpsc::Sender<Vec<u8>>,
    ) -> Result<Digest, UploadError> {
        loop {
            let (buf, d) = match hashed.recv() {
                Ok(Hashed::Chunk(buf, d)) => (buf, d),
                Ok(Hashed::End(image)) => return Ok(image),
                Err(_) => return Err(UploadError::StreamEnded),
            };
            let index = self.list.chunks.len();
            self.state.chunk = index;
            self.state.chunks = self.state.chunks.max(index + 1);
            self.state.bytes_total = self
                .state
                .bytes_total
                .max(self.list.total_size + buf.len() as u64);
            let sent = self.retrying(|fs, s| s.put_chunk(fs, index, &buf, &d))?;
            if sent {
                self.state.sent += 1;
                self.bytes_sent += buf.len() as u64;
            } else {
                self.state.skipped += 1;
                self.state.bytes_done += buf.len() as u64;
            }
            self.tries = 0;
            self.list.chunks.push(Chunk {
                size: buf.len() as u64,
                blake3: d.blake3,
            });
            self.list.total_size += buf.len() as u64;
            (self.progress)(&self.state);
            // Back to the pool only now: until the server holds the chunk
            // it may have to be sent again.
            let _ = free.send(buf);
        }
    }

    /// Puts chunk `index` on the server unless the server holds it already;
    /// true when it was sent.
    fn put_chunk(
        &mut self,
        fs: &dyn SpoolFs,
        index: usize,
        data: &[u8],
        d: &Digest,
    ) -> Result<bool, UploadError> {
        ensure_held(fs, self.lease)?;
        if self.present.is_none() {
            let names = io_ctx(fs.list(&self.dir), || format!("listing {}", self.dir))?;
            self.present = Some(names.into_iter().collect());
        }
        let name = chunk_name(index);
        let path = format!("{}/{name}", self.dir);
        if self.present.as_mut().is_some_and(|p| p.remove(&name)) {
            if held_matches(fs, &path, d)? {
                return Ok(false);
            }
            // Not this stream's chunk (another capture, or cut short by
            // hand): it must not stay under the final name.
            io_ctx(fs.remove(&path), || format!("removing {path}"))?;
        }
        let tmp = temp_name(&path);
        let done_before = self.state.bytes_done;
        let r = self
            .write_chunk(fs, &tmp, data)
            .and_then(|()| finish_chunk(fs, &tmp, &path, d));
        if r.is_err() {
            let _ = fs.remove(&tmp);
            self.state.bytes_done = done_before;
        }
        r.map(|()| true)
    }

    fn write_chunk(&mut self, fs: &dyn SpoolFs, tmp: &str, data: &[u8]) -> Result<(), UploadError> {
        let mut out = io_ctx(fs.create_write(tmp), || format!("creating {tmp}"))?;
        for piece in data.chunks(BUFFER) {
            io_ctx(out.write_all(piece), || format!("writing {tmp}"))?;
            self.state.bytes_done += piece.len() as u64;
            (self.progress)(&self.state);
        }
        // Once flushed, every byte of the chunk is on the server: it may
        // take its final name.
        io_ctx(out.flush(), || format!("writing {tmp}"))
    }

    /// The chunk list, the job log and, last, the manifest.
    fn finish(
        &mut self,
        image: &Digest,
        manifest: &ImageManifest,
        job_log: Option<&Path>,
        image_name: &str,
    ) -> Result<UploadReport, UploadError> {
        if manifest.image_size != image.size || manifest.image_blake3 != image.blake3 {
            return Err(UploadError::Image {
                path: image_name.to_string(),
                problem: format!(
                    "has {} bytes with BLAKE3 {}, the manifest says {} bytes with {}",
                    image.size, image.blake3, manifest.image_size, manifest.image_blake3
                ),
            });
        }
        let log = match job_log {
            Some(p) => Some(io_ctx(std::fs::read(p), || {
                format!("reading {}", p.display())
            })?),
            None => None,
        };
        let chunks_text = self.list.to_toml();
        let manifest_text = manifest.to_toml();
        self.retrying(|fs, s| {
            ensure_held(fs, s.lease)?;
            let chunks_path = format!("{}/{CHUNKS}", s.dir);
            io_ctx(
                fs.write_atomic(&chunks_path, chunks_text.as_bytes()),
                || format!("writing {chunks_path}"),
            )?;
            if let Some(text) = &log {
                let log_path = format!("{}/{JOB_LOG}", s.dir);
                io_ctx(fs.write_atomic(&log_path, text), || {
                    format!("writing {log_path}")
                })?;
            }
            ensure_held(fs, s.lease)?;
            let manifest_path = format!("{}/{MANIFEST}", s.dir);
            io_ctx(
                fs.write_atomic(&manifest_path, manifest_text.as_bytes()),
                || format!("writing {manifest_path}"),
            )
        })?;
        Ok(UploadReport {
            dir: self.dir.clone(),
            chunks: self.list.chunks.len(),
            sent: self.state.sent,
            skipped: self.state.skipped,
            bytes_sent: self.bytes_sent,
            image_size: image.size,
            image_blake3: image.blake3.clone(),
            resumed: self.resumed,
        })
    }
}

/// An error and its sources, as one line.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        line.push_str(": ");
        line.push_str(&s.to_string());
        next = s.source();
    }
    line
}

/// True when the server's file at `path` is the chunk `d` describes: the
/// same size and, read back, the same BLAKE3.
fn held_matches(fs: &dyn SpoolFs, path: &str, d: &Digest) -> Result<bool, UploadError> {
    if io_ctx(fs.size(path), || format!("reading {path}"))? != Some(d.size) {
        return Ok(false);
    }
    let r = io_ctx(fs.open_read(path), || format!("reading {path}"))?;
    let held = io_ctx(digest(Limit::new(r, d.size, path)), || {
        format!("reading {path}")
    })?;
    Ok(held == *d)
}

/// Gives a whole chunk its final name. If the name is taken by the same
/// chunk (a rename whose reply was lost in a cut), that one stands; any
/// other file there is replaced.
fn finish_chunk(fs: &dyn SpoolFs, tmp: &str, path: &str, d: &Digest) -> Result<(), UploadError> {
    let rename = |fs: &dyn SpoolFs| {
        io_ctx(fs.rename_noclobber(tmp, path), || {
            format!("renaming {tmp} to {path}")
        })
    };
    match fs.rename_noclobber(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if held_matches(fs, path, d)? {
                io_ctx(fs.remove(tmp), || format!("removing {tmp}"))
            } else {
                io_ctx(fs.remove(path), || format!("removing {path}"))?;
                rename(fs)
            }
        }
        Err(e) => Err(UploadError::Io {
            what: format!("renaming {tmp} to {path}"),
            source: e,
        }),
    }
}

/// Uploads `image` (the compressed image file that `manifest` describes)
/// with the job log beside it, then the manifest. Chunks the server already
/// holds are read back and not sent again when they match. The lease is
/// checked before every chunk and before the manifest; the upload stops at
/// once if it is gone or replaced. A cut fails the upload: call again to
/// resume.
pub fn upload(
    fs: &dyn SpoolFs,
    lease: &Lease,
    image: &Path,
    manifest: &ImageManifest,
    job_log: Option<&Path>,
    opts: &UploadOptions,
    progress: &mut dyn FnMut(&UploadProgress),
) -> Result<UploadReport, UploadError> {
    check_lease_fields(lease)?;
    check_chunk_size(opts.chunk_size)?;
    let image_name = image.display().to_string();
    let mut file = io_ctx(File::open(image), || format!("opening {image_name}"))?;
    let total = io_ctx(file.metadata(), || format!("reading {image_name}"))?.len();
    if total != manifest.image_size {
        return Err(UploadError::Image {
            path: image_name,
            problem: format!(
                "is {total} bytes, the manifest says {}",
                manifest.image_size
            ),
        });
    }
    let plan = ChunkPlan::new(opts.chunk_size, FILE_WINDOW);
    let Pipes {
        mut sink,
        full,
        image: image_tx,
        hashed: (hashed_tx, hashed),
        free,
    } = pipes(plan);
    let mut sender = Sender::new(fs, lease, plan.chunk_size, None, progress);
    sender.state.bytes_total = total;
    sender.state.chunks = total.div_ceil(plan.chunk_size) as usize;
    sender.start()?;
    // The file is read on a thread of its own and hashed on another, a
    // few chunks ahead, while this one only talks to the server.
    std::thread::scope(|scope| {
        scope.spawn(move || hash_chunks(full, hashed_tx, image_tx));
        let reader = scope.spawn(move || {
            sink.fill_from(&mut file)?;
            sink.finish()
        });
        // Owned here, so that they close when sending stops (for an error
        // too) and the other threads, blocked on either, end.
        let (hashed, free) = (hashed, free);
        let sent = sender.chunks(&hashed, &free);
        drop((hashed, free));
        let read = reader.join().unwrap_or_else(|_| Err(stopped()));
        let image_digest = match (sent, read) {
            (Ok(d), _) => d,
            (Err(UploadError::StreamEnded), Err(e)) => {
                return Err(UploadError::Io {
                    what: format!("reading {image_name}"),
                    source: e,
                })
            }
            (Err(e), _) => return Err(e),
        };
        sender.finish(&image_digest, manifest, job_log, &image_name)
    })
}

fn check_chunk_size(chunk_size: u64) -> Result<(), UploadError> {
    if chunk_size == 0 {
        return Err(UploadError::Io {
            what: "chunk size".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "is 0"),
        });
    }
    Ok(())
}

/// A streamed upload's settings.
pub struct StreamOptions<'a> {
    /// Chunks and their buffers: see [`ChunkPlan`].
    pub plan: ChunkPlan,
    pub job_log: Option<&'a Path>,
    /// How a cut is resumed; `None` fails the upload at the first cut.
    pub resume: Option<Resume<'a>>,
    /// Called on the sending thread.
    pub progress: &'a (dyn Fn(&UploadProgress) + Sync),
}

/// Uploads the image that `produce` writes into its [`ChunkSink`] while it
/// produces it. `produce` runs on the calling thread; it calls
/// [`ChunkSink::finish`] for the image's size and BLAKE3 and returns the
/// manifest, which is uploaded last, after the chunk list and the job log.
/// Hashing and sending run on threads of their own; at most `plan.buffers`
/// chunks are in flight, and `produce` waits while they all are.
///
/// Chunks the server already holds (from an earlier attempt at the same
/// lease) are read back and skipped when they match the stream's. After a
/// cut the upload resumes on a new session (see [`Resume`]) with the
/// chunks it still holds. If the upload fails, the sink refuses further
/// writes and the upload's error is returned, not the producer's.
pub fn upload_stream<E>(
    fs: &(dyn SpoolFs + Sync),
    lease: &Lease,
    opts: &StreamOptions,
    produce: impl FnOnce(&mut ChunkSink) -> Result<ImageManifest, E>,
) -> Result<UploadReport, StreamError<E>> {
    upload_stream_with(fs, lease, opts, &|_| {}, produce)
}

/// [`upload_stream`], with `complete` called on the manifest once every
/// chunk is on the server, just before the chunk list and the manifest are
/// written: it may record the upload's own time in it.
pub fn upload_stream_with<E>(
    fs: &(dyn SpoolFs + Sync),
    lease: &Lease,
    opts: &StreamOptions,
    complete: &(dyn Fn(&mut ImageManifest) + Sync),
    produce: impl FnOnce(&mut ChunkSink) -> Result<ImageManifest, E>,
) -> Result<UploadReport, StreamError<E>> {
    check_lease_fields(lease).map_err(StreamError::Upload)?;
    check_chunk_size(opts.plan.chunk_size).map_err(StreamError::Upload)?;
    let Pipes {
        mut sink,
        full,
        image: image_tx,
        hashed: (hashed_tx, hashed),
        free,
    } = pipes(opts.plan);
    let (manifest_tx, manifest_rx) = mpsc::channel::<ImageManifest>();
    std::thread::scope(|scope| {
        scope.spawn(move || hash_chunks(full, hashed_tx, image_tx));
        let sending = scope.spawn(move || {
            let mut progress = |p: &UploadProgress| (opts.progress)(p);
            let mut sender = Sender::new(
                fs,
                lease,
                opts.plan.chunk_size,
                opts.resume.as_ref(),
                &mut progress,
            );
            sender.start()?;
            let image = sender.chunks(&hashed, &free)?;
            drop((hashed, free));
            let mut manifest = manifest_rx.recv().map_err(|_| UploadError::StreamEnded)?;
            complete(&mut manifest);
            sender.finish(&image, &manifest, opts.job_log, "the image stream")
        });
        let produced = produce(&mut sink);
        if produced.is_ok() {
            // The producer may have left the last bytes to hand over.
            let _ = sink.finish();
        }
        // Closes the pipes, so that a failed producer stops the other stages.
        drop(sink);
        match produced {
            Ok(m) => {
                let _ = manifest_tx.send(m);
            }
            Err(e) => {
                drop(manifest_tx);
                let sent = sending.join();
                return Err(match sent {
                    Ok(Err(u)) if !matches!(u, UploadError::StreamEnded) => StreamError::Upload(u),
                    _ => StreamError::Produce(e),
                });
            }
        };
        drop(manifest_tx);
        sending
            .join()
            .unwrap_or(Err(UploadError::StreamEnded))
            .map_err(StreamError::Upload)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::claim::claim_next;
    use crate::master;
    use crate::master::reap;
    use crate::spool::{image_dir, lease_path, LocalSpool};
    use crate::time::Timestamp;
    use crate::upload::IMAGE_FILE;

    const T0: Timestamp = Timestamp(1_900_000_000);
    const JOB: &str = "id = \"j1\"\npriority = 1\ntime_limit = \"1h\"\nmax_attempts = 3\n\
                   [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";

    fn spool_with_job() -> (tempfile::TempDir, LocalSpool, Lease) {
        let dir = tempfile::tempdir().unwrap();
        let fs = LocalSpool::new(dir.path().join("spool"));
        std::fs::create_dir(fs.root()).unwrap();
        master::init(&fs).unwrap();
        master::add_job(&fs, JOB, Path::new("j1.toml"), T0).unwrap();
        let lease = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
        (dir, fs, lease)
    }

    /// An image of `size` bytes for job j1 of a spool made by [`spool_with_job`].
    fn image(dir: &Path, size: usize) -> (std::path::PathBuf, ImageManifest) {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + i / 977) as u8).collect();
        let path = dir.join("image.raw.zst");
        std::fs::write(&path, &data).unwrap();
        let manifest = ImageManifest {
            format: "raw.zst".into(),
            job: "j1".into(),
            job_blake3: blake3::hash(JOB.as_bytes()).to_hex().to_string(),
            agent: "agent-1".into(),
            disk_size: 1 << 30,
            block_size: 4096,
            bytes_read: size as u64,
            image_size: size as u64,
            image_blake3: blake3::hash(&data).to_hex().to_string(),
            payloads: vec![],
            started: T0,
            finished: T0,
            phases: vec![],
            ranges: vec![],
            generalized: Vec::new(),
            provenance: None,
        };
        (path, manifest)
    }

    #[test]
    fn uploads_resumes_and_publishes() {
        let (dir, fs, lease) = spool_with_job();
        let (path, manifest) = image(dir.path(), 5 * 100_000 + 12_345);
        let opts = UploadOptions {
            chunk_size: 100_000,
        };
        let log = dir.path().join("job.log");
        std::fs::write(&log, "built\n").unwrap();

        let r = upload(
            &fs,
            &lease,
            &path,
            &manifest,
            Some(&log),
            &opts,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((r.chunks, r.sent, r.skipped), (6, 6, 0));
        // Cut short: the manifest and two chunks never arrived.
        for name in [MANIFEST.to_string(), chunk_name(2), chunk_name(5)] {
            fs.remove(&format!("{}/{name}", r.dir)).unwrap();
        }
        let mut seen = Vec::new();
        let r = upload(&fs, &lease, &path, &manifest, Some(&log), &opts, &mut |p| {
            seen.push(*p)
        })
        .unwrap();
        assert_eq!(
            (r.chunks, r.sent, r.skipped, r.bytes_sent),
            (6, 2, 4, 112_345)
        );
        let last = seen.last().unwrap();
        assert_eq!((last.bytes_done, last.fraction()), (r.image_size, 1.0));

        let report = reap(&fs, T0.plus(std::time::Duration::from_secs(60))).unwrap();
        assert_eq!(report.published, ["j1"], "{report:?}");
        let published =
            std::fs::read(fs.path(&format!("{}/{IMAGE_FILE}", image_dir("j1")))).unwrap();
        assert_eq!(published, std::fs::read(&path).unwrap());
    }

    #[test]
    fn stops_when_the_lease_is_gone_and_refuses_a_changed_image() {
        let (dir, fs, lease) = spool_with_job();
        let (path, mut manifest) = image(dir.path(), 250_000);
        let opts = UploadOptions {
            chunk_size: 100_000,
        };
        manifest.image_blake3 = blake3::hash(b"other").to_hex().to_string();
        let e = upload(&fs, &lease, &path, &manifest, None, &opts, &mut |_| {}).unwrap_err();
        assert!(matches!(e, UploadError::Image { .. }), "{e}");
        assert!(!fs
            .exists(&format!("{}/{MANIFEST}", incoming_dir("j1", &lease.token)))
            .unwrap());

        let (_, manifest) = image(dir.path(), 250_000);
        let mut chunks_done = 0;
        let e = upload(&fs, &lease, &path, &manifest, None, &opts, &mut |p| {
            if p.sent + p.skipped > chunks_done {
                chunks_done = p.sent + p.skipped;
                if chunks_done == 1 {
                    fs.remove(&lease_path("j1")).unwrap();
                }
            }
        })
        .unwrap_err();
        assert!(e.is_lease_lost(), "{e}");
        assert_eq!(
            e.to_string(),
            "the lease on j1 is gone; stopping the upload"
        );
    }

    /// A local spool whose chunk writes fail while `cut` is raised, as a
    /// dropped link would make them.
    struct Flaky<'a> {
        inner: &'a LocalSpool,
        cut: &'a AtomicBool,
    }

    impl SpoolFs for Flaky<'_> {
        fn read(&self, path: &str) -> io::Result<Vec<u8>> {
            self.inner.read(path)
        }
        fn write_atomic(&self, path: &str, data: &[u8]) -> io::Result<()> {
            self.inner.write_atomic(path, data)
        }
        fn create_exclusive(&self, path: &str, data: &[u8]) -> io::Result<bool> {
            self.inner.create_exclusive(path, data)
        }
        fn list(&self, dir: &str) -> io::Result<Vec<String>> {
            self.inner.list(dir)
        }
        fn size(&self, path: &str) -> io::Result<Option<u64>> {
            self.inner.size(path)
        }
        fn remove(&self, path: &str) -> io::Result<()> {
            self.inner.remove(path)
        }
        fn remove_dir_all(&self, path: &str) -> io::Result<()> {
            self.inner.remove_dir_all(path)
        }
        fn mkdir_all(&self, path: &str) -> io::Result<()> {
            self.inner.mkdir_all(path)
        }
        fn rename_noclobber(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.rename_noclobber(from, to)
        }
        fn open_read(&self, path: &str) -> io::Result<Box<dyn Read + '_>> {
            self.inner.open_read(path)
        }
        fn create_write(&self, path: &str) -> io::Result<Box<dyn Write + '_>> {
            if self.cut.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "link cut"));
            }
            self.inner.create_write(path)
        }
    }

    fn stream_manifest(sink: &mut ChunkSink, data: &[u8]) -> io::Result<ImageManifest> {
        for piece in data.chunks(7_777) {
            sink.write_all(piece)?;
        }
        let d = sink.finish()?;
        let dir = tempfile::tempdir().unwrap();
        let (_, mut m) = image(dir.path(), 0);
        m.image_size = d.size;
        m.image_blake3 = d.blake3;
        Ok(m)
    }

    fn published(fs: &LocalSpool) -> Vec<u8> {
        let report = reap(fs, T0.plus(std::time::Duration::from_secs(60))).unwrap();
        assert_eq!(report.published, ["j1"], "{report:?}");
        std::fs::read(fs.path(&format!("{}/{IMAGE_FILE}", image_dir("j1")))).unwrap()
    }

    #[test]
    fn a_stream_resumes_after_a_cut_with_the_chunks_it_holds() {
        let (_dir, fs, lease) = spool_with_job();
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i * 7 + i / 1013) as u8)
            .collect();
        let cut = AtomicBool::new(false);
        let flaky = Flaky {
            inner: &fs,
            cut: &cut,
        };
        let abort = AtomicBool::new(false);
        let reconnects = std::sync::atomic::AtomicU32::new(0);
        let reconnect = || -> io::Result<Box<dyn SpoolFs>> {
            reconnects.fetch_add(1, Ordering::SeqCst);
            cut.store(false, Ordering::SeqCst);
            Ok(Box::new(fs.clone()))
        };
        let said = std::sync::Mutex::new(Vec::<String>::new());
        let say = |m: &str| said.lock().unwrap().push(m.to_string());
        let progress = |p: &UploadProgress| {
            if p.sent == 3 && p.chunk == 3 {
                cut.store(true, Ordering::SeqCst);
            }
        };
        let opts = StreamOptions {
            plan: ChunkPlan::new(100_000, 400_000),
            job_log: None,
            resume: Some(Resume {
                reconnect: &reconnect,
                retries: 3,
                wait: Duration::from_millis(10),
                abort: &abort,
                say: &say,
            }),
            progress: &progress,
        };
        assert_eq!(
            opts.plan,
            ChunkPlan {
                chunk_size: 100_000,
                buffers: 4
            }
        );
        let r = upload_stream(&flaky, &lease, &opts, |sink| stream_manifest(sink, &data)).unwrap();
        assert_eq!((r.chunks, r.sent, r.skipped, r.resumed), (10, 10, 0, 1));
        assert_eq!(reconnects.load(Ordering::SeqCst), 1);
        assert!(said.lock().unwrap()[0].contains("link cut"), "{said:?}");
        assert_eq!(published(&fs), data);
    }

    #[test]
    fn a_stream_skips_held_chunks_only_when_they_match() {
        let (_dir, fs, lease) = spool_with_job();
        let data: Vec<u8> = (0..450_000u32).map(|i| (i * 13 + i / 101) as u8).collect();
        let progress = |_: &UploadProgress| {};
        let opts = StreamOptions {
            plan: ChunkPlan::new(100_000, 400_000),
            job_log: None,
            resume: None,
            progress: &progress,
        };
        let r = upload_stream(&fs, &lease, &opts, |sink| stream_manifest(sink, &data)).unwrap();
        assert_eq!((r.chunks, r.sent), (5, 5));
        // An earlier attempt left chunks 0 to 3 and no manifest; chunk 1
        // was changed since, at the same size.
        let dir = fs.path(&r.dir);
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        std::fs::remove_file(dir.join(chunk_name(4))).unwrap();
        std::fs::write(dir.join(chunk_name(1)), vec![0u8; 100_000]).unwrap();
        let r = upload_stream(&fs, &lease, &opts, |sink| stream_manifest(sink, &data)).unwrap();
        assert_eq!(
            (r.chunks, r.sent, r.skipped, r.bytes_sent),
            (5, 2, 3, 150_000)
        );
        assert_eq!(published(&fs), data);
    }

    #[test]
    fn a_stream_stops_its_producer_when_the_lease_is_gone() {
        let (_dir, fs, lease) = spool_with_job();
        let progress = |p: &UploadProgress| {
            if p.sent == 1 {
                let _ = fs.remove(&lease_path("j1"));
            }
        };
        let opts = StreamOptions {
            plan: ChunkPlan::new(1000, 4000),
            job_log: None,
            resume: None,
            progress: &progress,
        };
        let mut written = 0u64;
        let e = upload_stream(&fs, &lease, &opts, |sink| -> io::Result<ImageManifest> {
            loop {
                sink.write_all(&[7u8; 500])?;
                written += 500;
            }
        })
        .unwrap_err();
        assert!(
            matches!(&e, StreamError::Upload(u) if u.is_lease_lost()),
            "{e}"
        );
        assert!(
            written < 20_000,
            "the producer waits for the window: {written}"
        );
    }
}
