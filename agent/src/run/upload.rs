//! The held job's image to the job server. The build's capture streams
//! straight into the upload ([`build_and_upload`]): no image file on the
//! agent, at most the configured `upload_window` of compressed image in
//! flight, and a cut link resumed on a new session with the chunks still
//! held. While the capture streams, a mark in the job's workspace names the
//! lease; an agent restarted with its lease still valid takes the upload up
//! ([`take_up`]): it captures the disk again (the same bytes) and skips the
//! chunks the server holds once they are read back and found equal.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kiln_spool::agent::claim::{check_lease, heartbeat, LeaseCheck};
use kiln_spool::agent::uploader::{
    upload_stream_with, ChunkSink, Resume, StreamError, StreamOptions, UploadProgress, UploadReport,
};
use kiln_spool::agent_config::Server;
use kiln_spool::lease::Lease;
use kiln_spool::manifest::{ImageManifest, PayloadHash, PhaseTime};
use kiln_spool::sftp::SftpSpool;
use kiln_spool::spool::SpoolFs;
use kiln_spool::status::{AgentState, Status};
use kiln_spool::stream::{digest, Digest};
use kiln_spool::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::download::download_job;
use super::heartbeat::{heartbeats, Beat};
use super::job::HeldJob;
use super::{connect, JobFailed, RunOptions};
use crate::build::{build_into, phase_time, provenance, BuildError, BuildRequest};
use crate::capture::window::{split_window_here, WindowSplit};
use crate::capture::{capture_to, CaptureOptions, ImageSink};
use crate::joblog::JobLog;
use crate::progress::{Event, EventKind, Phase};

/// Cuts in a row, without a chunk sent between them, before the job fails.
const UPLOAD_RETRIES: u32 = 6;
/// The wait before the first new session after a cut; it doubles.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The mark in a job's workspace while its capture streams.
const MARK: &str = "capture.toml";

/// What an agent restarted mid-upload needs to take it up.
#[derive(Debug, Serialize, Deserialize)]
struct CaptureMark {
    /// The job server (`host:port`) the upload goes to.
    server: String,
    /// The disk being captured.
    disk: PathBuf,
    /// The lease, as its file on the server says.
    lease: String,
}

/// Everything a streamed upload of one held job talks to.
struct Upload<'a> {
    opts: &'a RunOptions,
    server: &'a Server,
    spool: &'a SftpSpool,
    lease: &'a Lease,
    beat: &'a Beat,
    log: &'a JobLog,
    /// The job's workspace: the job log and the mark.
    dir: &'a Path,
    /// When the capture ended and the upload's own phase began.
    upload_began: Mutex<Option<(Timestamp, Instant)>>,
}

impl Upload<'_> {
    fn split(&self) -> WindowSplit {
        let window = self.opts.config.upload_window;
        let split = split_window_here(window, self.opts.upload.chunk_size);
        self.log.line(&format!(
            "upload window {window} bytes: {} zstd workers, {} chunk buffers of {} bytes",
            split.workers, split.chunks.buffers, split.chunks.chunk_size
        ));
        split
    }

    /// Uploads what `produce` writes into its sink, marking the workspace
    /// from the first byte until the upload ends either way.
    fn stream<E>(
        &self,
        split: &WindowSplit,
        produce: impl FnOnce(&mut dyn ImageSink) -> Result<ImageManifest, E>,
    ) -> Result<UploadReport, StreamError<E>> {
        let (opts, server, beat, log) = (self.opts, self.server, self.beat, self.log);
        let reconnect = || -> io::Result<Box<dyn SpoolFs>> {
            connect(opts, server)
                .map(|s| Box::new(s) as Box<dyn SpoolFs>)
                .map_err(|e| io::Error::other(format!("{e:#}")))
        };
        let say = |m: &str| {
            log.line(m);
            beat.set(|st| st.message = m.to_string());
        };
        let progress = |p: &UploadProgress| {
            beat.set(|st| {
                if st.phase == Phase::Upload {
                    st.bytes_done = p.bytes_done.min(st.bytes_total);
                    if st.bytes_total > 0 {
                        st.progress = (st.bytes_done as f64 / st.bytes_total as f64) as f32;
                    }
                }
            });
        };
        let log_file = log.path();
        let options = StreamOptions {
            plan: split.chunks,
            job_log: Some(&log_file),
            resume: Some(Resume {
                reconnect: &reconnect,
                retries: UPLOAD_RETRIES,
                wait: FIRST_WAIT,
                abort: &beat.abort,
                say: &say,
            }),
            progress: &progress,
        };
        let mark_path = self.dir.join(MARK);
        let mark = CaptureMark {
            server: server.address.clone(),
            disk: opts.disk.clone(),
            lease: self.lease.to_toml(),
        };
        let mark_text = toml::to_string(&mark).expect("a mark always serializes");
        let complete = |m: &mut ImageManifest| self.completed(m);
        let r = upload_stream_with(self.spool, self.lease, &options, &complete, |sink| {
            let mut marking = Marking {
                sink,
                mark: Some((&mark_path, &mark_text)),
            };
            produce(&mut marking)
        });
        let _ = std::fs::remove_file(&mark_path);
        r
    }

    /// The capture is done: the rest is the image's tail, the chunk list
    /// and the manifest, the upload's own phase.
    fn captured(&self, manifest: &ImageManifest) {
        *self.upload_began.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Timestamp::now(), Instant::now()));
        self.beat.set(|st| {
            st.state = AgentState::Uploading;
            st.phase = Phase::Upload;
            st.bytes_done = 0;
            st.bytes_total = manifest.image_size;
            st.message = format!("{} bytes", manifest.image_size);
        });
        self.log.line(&format!(
            "captured {} bytes; uploading the rest and the manifest",
            manifest.image_size
        ));
        self.log.sync();
    }

    /// Every chunk is on the server: the upload phase ends as the manifest
    /// is written.
    fn completed(&self, manifest: &mut ImageManifest) {
        let began = *self.upload_began.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((started, t)) = began {
            let seconds = t.elapsed().as_secs_f64();
            manifest
                .phases
                .push(phase_time(Phase::Upload, started, seconds));
        }
        manifest.finished = Timestamp::now();
    }

    fn done(&self, report: &UploadReport) {
        self.log.line(&format!(
            "uploaded: {} chunks sent, {} already held, {} new sessions",
            report.sent, report.skipped, report.resumed
        ));
    }
}

/// The upload's sink, which writes the mark before the first byte.
struct Marking<'a> {
    sink: &'a mut ChunkSink,
    mark: Option<(&'a Path, &'a str)>,
}

impl Write for Marking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some((path, text)) = self.mark.take() {
            std::fs::write(path, text)?;
        }
        self.sink.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

impl ImageSink for Marking<'_> {
    fn finish(&mut self) -> io::Result<Digest> {
        self.sink.finish()
    }
    fn what(&self) -> String {
        "the image to the upload".into()
    }
}

/// Builds the job and uploads its image as it is captured, then the
/// manifest. A failed build keeps its phase in the status; a failed upload
/// says `upload`.
pub(super) fn build_and_upload(
    held: &HeldJob,
    req: &BuildRequest,
    download: PhaseTime,
    on_event: &mut dyn FnMut(&Event),
) -> Result<UploadReport> {
    let up = Upload {
        opts: held.opts,
        server: held.server,
        spool: held.spool,
        lease: held.lease,
        beat: &held.beat,
        log: &held.log,
        dir: &held.dir,
        upload_began: Mutex::new(None),
    };
    let split = up.split();
    let result = up.stream(&split, |sink| {
        let mut manifest = build_into(req, sink, split.workers, on_event, &up.beat.abort)?;
        // The job began with its download, before the build's first phase.
        if let Some(t) = download.started {
            manifest.started = manifest.started.min(t);
        }
        manifest.phases.insert(0, download);
        on_event(&Event {
            phase: Phase::Upload,
            kind: EventKind::Started,
        });
        up.captured(&manifest);
        Ok::<_, BuildError>(manifest)
    });
    match result {
        Ok(report) => {
            up.done(&report);
            Ok(report)
        }
        Err(StreamError::Produce(e)) => {
            up.beat.set(|st| st.phase = e.phase);
            Err(anyhow!(e.one_line()))
        }
        Err(StreamError::Upload(e)) => {
            up.beat.set(|st| st.phase = Phase::Upload);
            Err(e.into())
        }
    }
}

/// After a restart: takes up the upload this agent was streaming to
/// `server` when it stopped, if the lease is still its own. A mark whose
/// lease is gone or someone else's is dropped: the new holder's upload is
/// the one that counts. Returns the job once its upload is complete.
pub(super) fn take_up(
    opts: &RunOptions,
    server: &Server,
    spool: &SftpSpool,
    say: &mut dyn FnMut(&str),
) -> Result<Option<String>> {
    let jobs = opts.work_dir.join("jobs");
    let Ok(dirs) = std::fs::read_dir(&jobs) else {
        return Ok(None);
    };
    for dir in dirs.flatten() {
        let dir = dir.path();
        let path = dir.join(MARK);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mark = toml::from_str::<CaptureMark>(&text)
            .ok()
            .and_then(|m| Lease::parse(&m.lease).ok().map(|l| (m, l)));
        let Some((mark, lease)) = mark else {
            say(&format!("{}: unreadable; dropped", path.display()));
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if mark.server != server.address {
            continue;
        }
        if lease.agent != opts.agent_id || mark.disk != opts.disk {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match check_lease(spool, &lease).context("checking a lease to take up")? {
            LeaseCheck::Held => {}
            LeaseCheck::Gone | LeaseCheck::Replaced { .. } => {
                say(&format!(
                    "{}: the lease was lost while the agent was down; its upload is dropped",
                    lease.job
                ));
                let _ = std::fs::remove_file(&path);
                continue;
            }
        }
        say(&format!(
            "{}: taking up the upload of token {} after a restart",
            lease.job, lease.token
        ));
        let job = lease.job.clone();
        let r = resume_upload(opts, server, spool, &lease, &dir);
        let _ = std::fs::remove_file(&path);
        return match r {
            Ok(report) => {
                say(&format!(
                    "{job}: uploaded: {} chunks sent, {} already held",
                    report.sent, report.skipped
                ));
                Ok(Some(job))
            }
            Err(e) => {
                let reason = format!("{e:#}");
                say(&format!("{job}: failed: {reason}"));
                Err(JobFailed { job, reason }.into())
            }
        };
    }
    Ok(None)
}

/// Captures the disk again into the upload under `lease`, with the
/// heartbeat running; the manifest is made from the job file.
fn resume_upload(
    opts: &RunOptions,
    server: &Server,
    spool: &SftpSpool,
    lease: &Lease,
    dir: &Path,
) -> Result<UploadReport> {
    let now = Timestamp::now();
    let t = Instant::now();
    let (text, job) = download_job(spool, lease)?;
    let download = phase_time(Phase::Download, now, t.elapsed().as_secs_f64());
    let beat = Beat::new(Status {
        job: lease.job.clone(),
        agent: opts.agent_id.clone(),
        token: lease.token.clone(),
        server: server.address.clone(),
        state: AgentState::Uploading,
        phase: Phase::Capture,
        progress: 0.0,
        bytes_done: 0,
        bytes_total: 0,
        message: "taking up the upload after a restart".into(),
        started: now,
        updated: now,
    });
    let log_file = dir.join("job.log");
    let log =
        JobLog::create(&log_file).with_context(|| format!("creating {}", log_file.display()))?;
    log.line(&format!(
        "agent {} takes up the upload of {} (token {}) after a restart",
        opts.agent_id, lease.job, lease.token
    ));
    let up = Upload {
        opts,
        server,
        spool,
        lease,
        beat: &beat,
        log: &log,
        dir,
        upload_began: Mutex::new(None),
    };
    let result = std::thread::scope(|s| {
        s.spawn(|| heartbeats(opts, server, lease, &beat));
        let split = up.split();
        let capture_opts = CaptureOptions {
            level: job.image.compression_level,
            threads: split.workers,
        };
        let r = up.stream(&split, |sink| {
            let capture_started = Timestamp::now();
            let t = Instant::now();
            let mut events = |e: &Event| {
                if let EventKind::Progress { done, total } = e.kind {
                    beat.set(|st| {
                        st.bytes_done = done;
                        st.bytes_total = total;
                        st.progress = e.fraction().unwrap_or(st.progress);
                    });
                }
            };
            let cap = capture_to(&opts.disk, sink, &capture_opts, &mut events, &beat.abort)?;
            let manifest = ImageManifest {
                format: "raw.zst".into(),
                job: lease.job.clone(),
                job_blake3: digest(text.as_bytes())
                    .map(|d| d.blake3)
                    .unwrap_or_default(),
                agent: opts.agent_id.clone(),
                disk_size: cap.disk_size,
                block_size: cap.block_size,
                bytes_read: cap.bytes_read,
                image_size: cap.image_size,
                image_blake3: cap.image_blake3,
                payloads: job
                    .payloads
                    .iter()
                    .map(|p| PayloadHash {
                        name: p.name.clone(),
                        blake3: p.blake3.clone().unwrap_or_default(),
                    })
                    .collect(),
                started: now,
                finished: Timestamp::now(),
                // The build's own phases ran before the restart.
                phases: vec![
                    download,
                    phase_time(Phase::Capture, capture_started, t.elapsed().as_secs_f64()),
                ],
                ranges: cap.ranges,
                generalized: Vec::new(),
                provenance: Some(provenance(&opts.disk)),
            };
            up.captured(&manifest);
            Ok::<_, crate::Error>(manifest)
        });
        beat.finish();
        r
    });
    let result = match result {
        Ok(report) => {
            up.done(&report);
            beat.set(|st| {
                st.state = AgentState::Uploaded;
                st.progress = 1.0;
                st.message = format!(
                    "{} chunks sent, {} already held",
                    report.sent, report.skipped
                );
            });
            Ok(report)
        }
        Err(StreamError::Produce(e)) => Err(anyhow!(e.one_line())),
        Err(StreamError::Upload(e)) => Err(e.into()),
    };
    if let Err(e) = &result {
        log.line(&format!("failed: {e:#}"));
        beat.set(|st| {
            st.state = AgentState::Failed;
            st.message = format!("{e:#}");
        });
    }
    if beat.lost().is_none() {
        let _ = heartbeat(spool, lease, &beat.status());
    }
    result
}
