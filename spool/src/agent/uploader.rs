//! The agent's side of an upload: the image, cut in fixed-size chunks, into
//! `incoming/<job>/<token>/` (layout in [`crate::upload`]), resumable, with
//! the manifest written last. Generic over [`SpoolFs`], so the same code runs
//! over SFTP and on a local spool.
//!
//! A chunk appears under its final name only once it is whole (it is written
//! under a temporary name, synced, then renamed without clobbering), so after
//! a cut every chunk the server holds under its final name with the right
//! size is complete and is not sent again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;

use crate::agent::claim::{check_lease, LeaseCheck};
use crate::error::SpoolError;
use crate::lease::{check_token, Lease};
use crate::manifest::ImageManifest;
use crate::names::check_job_id;
use crate::spool::{incoming_dir, temp_name, SpoolFs};
use crate::upload::{chunk_name, Chunk, ChunkList, CHUNKS, JOB_LOG, MANIFEST};

/// 64 MiB: few enough chunks for a listing, small enough to resend after a cut.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// Bytes read from the image and handed to the writer at once: a multiple
/// of libssh2's 30,000-byte SFTP write, so that it pipelines the writes.
pub const BUFFER: usize = 128 * 30_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadOptions {
    pub chunk_size: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Where an upload is; handed to the progress callback after every buffer
/// written and after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadProgress {
    /// The chunk being worked on, from 0.
    pub chunk: usize,
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
}

impl UploadError {
    /// True when the agent no longer holds the job and must drop it at once.
    pub fn is_lease_lost(&self) -> bool {
        matches!(
            self,
            UploadError::LeaseGone { .. } | UploadError::LeaseReplaced { .. }
        )
    }
}

fn io_ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, UploadError> {
    r.map_err(|source| UploadError::Io {
        what: what(),
        source,
    })
}

fn ensure_held(fs: &dyn SpoolFs, lease: &Lease) -> Result<(), UploadError> {
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

/// Uploads `image` (the compressed image file that `manifest` describes)
/// with the job log beside it, then the manifest. Chunks the server already
/// holds whole are not sent again. The lease is checked before every chunk
/// and before the manifest; the upload stops at once if it is gone or replaced.
pub fn upload(
    fs: &dyn SpoolFs,
    lease: &Lease,
    image: &Path,
    manifest: &ImageManifest,
    job_log: Option<&Path>,
    opts: &UploadOptions,
    progress: &mut dyn FnMut(&UploadProgress),
) -> Result<UploadReport, UploadError> {
    let bad_lease = |problem: String| UploadError::BadLease {
        job: lease.job.clone(),
        problem,
    };
    check_job_id(&lease.job).map_err(|p| bad_lease(format!("job id {p}")))?;
    check_token(&lease.token).map_err(bad_lease)?;
    if opts.chunk_size == 0 {
        return Err(UploadError::Io {
            what: "chunk size".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "is 0"),
        });
    }
    let image_name = image.display().to_string();
    let file = io_ctx(File::open(image), || format!("opening {image_name}"))?;
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
    let chunk_size = opts.chunk_size;
    let chunks = total.div_ceil(chunk_size) as usize;
    let dir = incoming_dir(&lease.job, &lease.token);

    ensure_held(fs, lease)?;
    io_ctx(fs.mkdir_all(&dir), || format!("creating {dir}"))?;
    let present: std::collections::HashSet<String> =
        io_ctx(fs.list(&dir), || format!("listing {dir}"))?
            .into_iter()
            .collect();

    // The image is read and hashed on a thread of its own, a few buffers
    // ahead, while this one only talks to the server.
    let (piece_tx, pieces) = mpsc::sync_channel::<Piece>(READ_AHEAD);
    let (free, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..READ_AHEAD {
        let _ = free.send(vec![0u8; BUFFER]);
    }
    let (sent, image_blake3) = std::thread::scope(|scope| {
        scope.spawn(move || read_image(file, total, chunk_size, &free_rx, &piece_tx));
        // Owned here, so that they close when sending stops (for an error
        // too) and the reading thread, blocked on either, ends.
        let (pieces, free) = (pieces, free);
        send_image(
            fs,
            lease,
            &dir,
            &present,
            &image_name,
            total,
            chunk_size,
            &pieces,
            &free,
            progress,
        )
    })?;
    let SendReport {
        list,
        sent,
        skipped,
        bytes_sent,
    } = sent;

    if image_blake3 != manifest.image_blake3 {
        return Err(UploadError::Image {
            path: image_name,
            problem: format!(
                "has BLAKE3 {image_blake3}, the manifest says {}",
                manifest.image_blake3
            ),
        });
    }

    ensure_held(fs, lease)?;
    let chunks_path = format!("{dir}/{CHUNKS}");
    io_ctx(
        fs.write_atomic(&chunks_path, list.to_toml().as_bytes()),
        || format!("writing {chunks_path}"),
    )?;
    if let Some(log) = job_log {
        let text = io_ctx(std::fs::read(log), || format!("reading {}", log.display()))?;
        let log_path = format!("{dir}/{JOB_LOG}");
        io_ctx(fs.write_atomic(&log_path, &text), || {
            format!("writing {log_path}")
        })?;
    }
    ensure_held(fs, lease)?;
    let manifest_path = format!("{dir}/{MANIFEST}");
    io_ctx(
        fs.write_atomic(&manifest_path, manifest.to_toml().as_bytes()),
        || format!("writing {manifest_path}"),
    )?;
    Ok(UploadReport {
        dir,
        chunks,
        sent,
        skipped,
        bytes_sent,
        image_size: total,
        image_blake3,
    })
}

/// Buffers in flight between the reading thread and the sending one.
const READ_AHEAD: usize = 4;

/// What the reading thread hands over, in image order.
enum Piece {
    /// The next bytes of the current chunk: `.0[..n]`.
    Data(Vec<u8>, usize),
    /// The current chunk is complete; its BLAKE3.
    ChunkEnd(String),
    /// The whole image is read; its BLAKE3.
    End(String),
    Failed(io::Error),
}

/// Reads the image chunk by chunk into buffers taken from `free`, hashing
/// each chunk and the whole image, and hands the buffers on. Stops quietly
/// when the sending side is gone.
fn read_image(
    mut file: File,
    total: u64,
    chunk_size: u64,
    free: &mpsc::Receiver<Vec<u8>>,
    out: &mpsc::SyncSender<Piece>,
) {
    let mut whole = blake3::Hasher::new();
    let mut offset = 0u64;
    while offset < total {
        let size = chunk_size.min(total - offset);
        let mut hasher = blake3::Hasher::new();
        let mut left = size;
        while left > 0 {
            let Ok(mut buf) = free.recv() else { return };
            let n = left.min(buf.len() as u64) as usize;
            if let Err(e) = file.read_exact(&mut buf[..n]) {
                let _ = out.send(Piece::Failed(e));
                return;
            }
            hasher.update(&buf[..n]);
            whole.update(&buf[..n]);
            left -= n as u64;
            if out.send(Piece::Data(buf, n)).is_err() {
                return;
            }
        }
        offset += size;
        if out
            .send(Piece::ChunkEnd(hasher.finalize().to_hex().to_string()))
            .is_err()
        {
            return;
        }
    }
    let _ = out.send(Piece::End(whole.finalize().to_hex().to_string()));
}

struct SendReport {
    list: ChunkList,
    sent: usize,
    skipped: usize,
    bytes_sent: u64,
}

/// The next piece from the reading thread; a read error comes back as the
/// error it is.
fn next_piece(pieces: &mpsc::Receiver<Piece>, image_name: &str) -> Result<Piece, UploadError> {
    match pieces.recv() {
        Ok(Piece::Failed(source)) => Err(UploadError::Io {
            what: format!("reading {image_name}"),
            source,
        }),
        Ok(p) => Ok(p),
        Err(_) => Err(UploadError::Io {
            what: format!("reading {image_name}"),
            source: io::Error::other("the reading thread stopped"),
        }),
    }
}

fn out_of_order(image_name: &str) -> UploadError {
    UploadError::Io {
        what: format!("reading {image_name}"),
        source: io::Error::other("pieces of the image arrived out of order"),
    }
}

/// Sends, chunk by chunk, what the reading thread hands over: chunks the
/// server holds whole are skipped, the others written under a temporary
/// name and renamed. Returns the chunk list and the whole image's BLAKE3.
#[allow(clippy::too_many_arguments)]
fn send_image(
    fs: &dyn SpoolFs,
    lease: &Lease,
    dir: &str,
    present: &std::collections::HashSet<String>,
    image_name: &str,
    total: u64,
    chunk_size: u64,
    pieces: &mpsc::Receiver<Piece>,
    free: &mpsc::Sender<Vec<u8>>,
    progress: &mut dyn FnMut(&UploadProgress),
) -> Result<(SendReport, String), UploadError> {
    let chunks = total.div_ceil(chunk_size) as usize;
    let mut state = UploadProgress {
        chunk: 0,
        chunks,
        bytes_done: 0,
        bytes_total: total,
        sent: 0,
        skipped: 0,
    };
    let mut list = ChunkList {
        chunk_size,
        total_size: total,
        chunks: Vec::with_capacity(chunks),
    };
    let mut bytes_sent = 0u64;

    for i in 0..chunks {
        state.chunk = i;
        ensure_held(fs, lease)?;
        let size = chunk_size.min(total - i as u64 * chunk_size);
        let name = chunk_name(i);
        let path = format!("{dir}/{name}");
        let held = if present.contains(&name) {
            io_ctx(fs.size(&path), || format!("reading {path}"))?
        } else {
            None
        };
        let blake3 = if held == Some(size) {
            // Whole on the server already: only hashed here.
            let blake3 = loop {
                match next_piece(pieces, image_name)? {
                    Piece::Data(buf, _) => {
                        let _ = free.send(buf);
                    }
                    Piece::ChunkEnd(b) => break b,
                    _ => return Err(out_of_order(image_name)),
                }
            };
            state.skipped += 1;
            state.bytes_done += size;
            blake3
        } else {
            if held.is_some() {
                // Cannot come from this uploader (chunks appear whole), but
                // a wrong size under the final name must not stay.
                io_ctx(fs.remove(&path), || format!("removing {path}"))?;
            }
            let tmp = temp_name(&path);
            let result = send_chunk(fs, &tmp, pieces, free, image_name, &mut |n| {
                state.bytes_done += n;
                progress(&state);
            })
            .and_then(|blake3| finish_chunk(fs, &tmp, &path, size).map(|()| blake3));
            if result.is_err() {
                let _ = fs.remove(&tmp);
            }
            let blake3 = result?;
            state.sent += 1;
            bytes_sent += size;
            blake3
        };
        list.chunks.push(Chunk { size, blake3 });
        progress(&state);
    }
    let image_blake3 = match next_piece(pieces, image_name)? {
        Piece::End(b) => b,
        _ => return Err(out_of_order(image_name)),
    };
    Ok((
        SendReport {
            list,
            sent: state.sent,
            skipped: state.skipped,
            bytes_sent,
        },
        image_blake3,
    ))
}

/// Streams one chunk, as the reading thread hands it over, into a new file
/// `tmp`; returns the chunk's BLAKE3 once every byte is on the server.
fn send_chunk(
    fs: &dyn SpoolFs,
    tmp: &str,
    pieces: &mpsc::Receiver<Piece>,
    free: &mpsc::Sender<Vec<u8>>,
    image_name: &str,
    on_written: &mut dyn FnMut(u64),
) -> Result<String, UploadError> {
    let mut out = io_ctx(fs.create_write(tmp), || format!("creating {tmp}"))?;
    loop {
        match next_piece(pieces, image_name)? {
            Piece::Data(buf, n) => {
                io_ctx(out.write_all(&buf[..n]), || format!("writing {tmp}"))?;
                let _ = free.send(buf);
                on_written(n as u64);
            }
            Piece::ChunkEnd(blake3) => {
                // Once flushed, every byte of the chunk is on the server: it
                // may take its final name.
                io_ctx(out.flush(), || format!("writing {tmp}"))?;
                return Ok(blake3);
            }
            _ => return Err(out_of_order(image_name)),
        }
    }
}

/// Gives a whole chunk its final name. If the name is taken by a chunk of
/// the right size (a rename whose reply was lost in a cut), that one stands.
fn finish_chunk(fs: &dyn SpoolFs, tmp: &str, path: &str, size: u64) -> Result<(), UploadError> {
    match fs.rename_noclobber(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let held = io_ctx(fs.size(path), || format!("reading {path}"))?;
            if held == Some(size) {
                io_ctx(fs.remove(tmp), || format!("removing {tmp}"))
            } else {
                Err(UploadError::Io {
                    what: format!("renaming {tmp} to {path}"),
                    source: e,
                })
            }
        }
        Err(e) => Err(UploadError::Io {
            what: format!("renaming {tmp} to {path}"),
            source: e,
        }),
    }
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
}
