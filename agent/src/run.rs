//! `kiln-agent run`: ask each job server in turn for the highest-priority
//! job nobody holds, claim it, build it, upload the image, and go on.
//!
//! While a job runs, a heartbeat thread with its own SSH session writes the
//! status (phase, progress, message) well inside the lease's time limit and
//! raises the abort flag the moment the lease is gone or someone else's.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kiln_spool::agent::claim::{claim_next, fetch_job, heartbeat, LeaseCheck};
use kiln_spool::agent::uploader::{upload, UploadOptions};
use kiln_spool::agent_config::{AgentConfig, Server};
use kiln_spool::job::{parse_job, JobSpec};
use kiln_spool::lease::Lease;
use kiln_spool::sftp::{SessionOptions, SftpSpool};
use kiln_spool::spool::{job_path, log_path, payload_path, SpoolFs};
use kiln_spool::status::{AgentState, Status};
use kiln_spool::time::Timestamp;

use crate::joblog::JobLog;
use crate::progress::{Event, EventKind};
use crate::{build, manifest_path_for, BuildRequest};

/// What `run` needs besides the config.
pub struct RunOptions {
    pub config: AgentConfig,
    pub agent_id: String,
    /// The disk to build on (overrides the config's `disk`).
    pub disk: PathBuf,
    /// Scratch space: the payload cache, images, job logs, mount points.
    pub work_dir: PathBuf,
    /// Do one job (or find none) and return.
    pub once: bool,
    pub upload: UploadOptions,
    pub session: SessionOptions,
}

/// How a `--once` run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Built { job: String },
    NothingToDo,
}

/// Runs jobs until `stop` is raised (or, with `once`, after one).
pub fn run(opts: &RunOptions, stop: &AtomicBool, say: &mut dyn FnMut(&str)) -> Result<Outcome> {
    if opts.config.servers.is_empty() {
        bail!("the agent config names no [[servers]]");
    }
    std::fs::create_dir_all(opts.work_dir.join("cache"))
        .with_context(|| format!("creating {}", opts.work_dir.join("cache").display()))?;
    let n = opts.config.servers.len();
    let mut next = 0;
    loop {
        let mut built = None;
        for k in 0..n {
            let idx = (next + k) % n;
            let server = &opts.config.servers[idx];
            match try_server(opts, server, stop, say) {
                Ok(Some(job)) => {
                    built = Some(Ok(job));
                    next = idx + 1;
                    break;
                }
                Ok(None) => {}
                Err(e) if opts.once && is_job_failure(&e) => {
                    built = Some(Err(e));
                    break;
                }
                Err(e) => say(&format!("server {}: {e:#}", server.address)),
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        match (built, opts.once) {
            (Some(Ok(job)), true) => return Ok(Outcome::Built { job }),
            (Some(Err(e)), true) => return Err(e),
            (None, true) => return Ok(Outcome::NothingToDo),
            (Some(_), false) => continue,
            (None, false) => {}
        }
        let until = Instant::now() + opts.config.poll_interval.0;
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return Ok(Outcome::NothingToDo);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A job that was claimed and then failed, as opposed to a server that
/// could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("job {job}: {reason}")]
pub struct JobFailed {
    pub job: String,
    pub reason: String,
}

fn is_job_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<JobFailed>().is_some()
}

fn connect(opts: &RunOptions, server: &Server) -> Result<SftpSpool> {
    SftpSpool::connect(server, &opts.session)
        .with_context(|| format!("connecting to {}", server.address))
}

/// Claims and builds this server's highest-priority available job, if any.
fn try_server(
    opts: &RunOptions,
    server: &Server,
    stop: &AtomicBool,
    say: &mut dyn FnMut(&str),
) -> Result<Option<String>> {
    let spool = connect(opts, server)?;
    let Some(lease) =
        claim_next(&spool, &opts.agent_id, Timestamp::now()).context("claiming a job")?
    else {
        return Ok(None);
    };
    say(&format!(
        "claimed {} on {} (attempt {}, deadline {})",
        lease.job, server.address, lease.attempt, lease.deadline
    ));
    let job = lease.job.clone();
    match do_job(opts, server, &spool, &lease, stop, say) {
        Ok(()) => {
            say(&format!("{job}: uploaded; the master publishes it"));
            Ok(Some(job))
        }
        Err(e) => {
            let reason = format!("{e:#}");
            say(&format!("{job}: failed: {reason}"));
            Err(JobFailed { job, reason }.into())
        }
    }
}

/// The holder's view of its job, shared with the heartbeat thread.
struct Shared {
    status: Mutex<Status>,
    /// Raised when the lease is lost (or the agent stops): the build and
    /// the upload stop at their next check.
    abort: AtomicBool,
    lost: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.updated = Timestamp::now();
    }
}

fn heartbeat_every(lease: &Lease) -> Duration {
    let limit = lease.acquired.secs_until(lease.deadline).max(1) as u64;
    Duration::from_secs((limit / 10).clamp(1, 15))
}

fn heartbeats(opts: &RunOptions, server: &Server, lease: &Lease, shared: &Shared) {
    let every = heartbeat_every(lease);
    let mut spool: Option<SftpSpool> = None;
    let mut last = Instant::now() - every;
    while !shared.done.load(Ordering::SeqCst) {
        if last.elapsed() < every {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        last = Instant::now();
        if spool.is_none() {
            spool = connect(opts, server).ok();
        }
        let Some(fs) = &spool else { continue };
        let status = shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match heartbeat(fs, lease, &status) {
            Ok(LeaseCheck::Held) => {}
            Ok(LeaseCheck::Gone) => {
                return lose(shared, "the lease is gone (reaped, cancelled or reclaimed)")
            }
            Ok(LeaseCheck::Replaced { by_agent }) => {
                return lose(shared, &format!("the lease now belongs to {by_agent}"))
            }
            // A dropped link is retried on the next beat with a new session.
            Err(_) => spool = None,
        }
    }
}

fn lose(shared: &Shared, why: &str) {
    *shared.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    shared.abort.store(true, Ordering::SeqCst);
}

fn do_job(
    opts: &RunOptions,
    server: &Server,
    spool: &SftpSpool,
    lease: &Lease,
    stop: &AtomicBool,
    say: &mut dyn FnMut(&str),
) -> Result<()> {
    let now = Timestamp::now();
    let shared = Shared {
        status: Mutex::new(Status {
            job: lease.job.clone(),
            agent: opts.agent_id.clone(),
            token: lease.token.clone(),
            server: server.address.clone(),
            state: AgentState::Building,
            phase: "download".into(),
            progress: 0.0,
            message: String::new(),
            started: now,
            updated: now,
        }),
        abort: AtomicBool::new(false),
        lost: Mutex::new(None),
        done: AtomicBool::new(false),
    };
    let job_dir = opts.work_dir.join("jobs").join(&lease.job);
    std::fs::create_dir_all(&job_dir).with_context(|| format!("creating {}", job_dir.display()))?;
    let log_file = job_dir.join("job.log");
    let log =
        JobLog::create(&log_file).with_context(|| format!("creating {}", log_file.display()))?;
    log.line(&format!(
        "agent {} holds {} (token {}, attempt {})",
        opts.agent_id, lease.job, lease.token, lease.attempt
    ));

    let mut failed_in: Option<&'static str> = None;
    let result = std::thread::scope(|s| {
        s.spawn(|| heartbeats(opts, server, lease, &shared));
        let r = (|| -> Result<()> {
            let watch_stop = || {
                if stop.load(Ordering::SeqCst) {
                    shared.abort.store(true, Ordering::SeqCst);
                }
            };
            let (text, job) = download_job(spool, &lease)?;
            let payload_dir = fetch_payloads(opts, spool, &job, &job_dir, &shared, &log)?;
            watch_stop();
            let image = job_dir.join(format!("{}.raw.zst", lease.job));
            // The engine cleans up (unmounts) after a failed phase; the
            // status must name the phase that failed, not the clean-up.
            let mut open: Option<&'static str> = None;
            let mut on_event = |e: &Event| {
                watch_stop();
                match e.kind {
                    EventKind::Started => {
                        if let Some(p) = open.replace(e.phase.as_str()) {
                            failed_in.get_or_insert(p);
                        }
                    }
                    EventKind::Finished { seconds } => {
                        open = None;
                        say(&format!("{}: {} done in {seconds:.1}s", lease.job, e.phase));
                    }
                    _ => {}
                }
                shared.set(|st| {
                    st.phase = e.phase.as_str().to_string();
                    if let Some(f) = e.fraction() {
                        st.progress = f;
                    }
                    if let EventKind::Message(m) = &e.kind {
                        st.message = m.clone();
                    }
                });
            };
            let mounts = job_dir.join("mnt");
            std::fs::create_dir_all(&mounts)
                .with_context(|| format!("creating {}", mounts.display()))?;
            let req = BuildRequest {
                job: &job,
                job_text: &text,
                payload_dir: &payload_dir,
                disk: &opts.disk,
                out: &image,
                log: &log,
                agent_id: &opts.agent_id,
                work_dir: &mounts,
            };
            let built = build(&req, &mut on_event, &shared.abort);
            let manifest = built.map_err(|e| {
                let phase = failed_in.or(open).unwrap_or("build");
                shared.set(|st| st.phase = phase.to_string());
                anyhow!(e.one_line())
            })?;
            shared.set(|st| {
                st.state = AgentState::Uploading;
                st.phase = "upload".into();
                st.progress = 0.0;
                st.message = format!("{} bytes", manifest.image_size);
            });
            log.line(&format!(
                "uploading {} ({} bytes)",
                image.display(),
                manifest.image_size
            ));
            log.sync();
            let report = upload_resuming(
                opts,
                server,
                spool,
                lease,
                &image,
                &manifest,
                &log_file,
                &shared,
                &log,
                &watch_stop,
            )?;
            shared.set(|st| {
                st.state = AgentState::Uploaded;
                st.progress = 1.0;
                st.message = format!(
                    "{} chunks sent, {} already held",
                    report.sent, report.skipped
                );
            });
            // Free the scratch space (in RAM on a PXE-booted machine).
            let _ = std::fs::remove_file(&image);
            let _ = std::fs::remove_file(manifest_path_for(&image));
            Ok(())
        })();
        shared.done.store(true, Ordering::SeqCst);
        r
    });

    let lost = shared
        .lost
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match (&result, lost) {
        (_, Some(why)) => {
            log.line(&format!("stopped: {why}"));
            say(&format!("{}: stopped: {why}", lease.job));
            bail!("stopped: {why}");
        }
        (Ok(()), None) => {
            // The last heartbeat says the upload is complete.
            let status = shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // The upload is complete and the master publishes it whatever
            // the status says; a link that dropped since only loses the
            // last heartbeat, so retry once on a new session and go on.
            if heartbeat(spool, lease, &status).is_err() {
                let retried =
                    connect(opts, server).and_then(|fs| Ok(heartbeat(&fs, lease, &status)?));
                if let Err(e) = retried {
                    say(&format!(
                        "{}: the final status was not written: {e:#}",
                        lease.job
                    ));
                }
            }
            Ok(())
        }
        (Err(e), None) => {
            let reason = format!("{e:#}");
            log.line(&format!("failed: {reason}"));
            log.sync();
            shared.set(|st| {
                st.state = AgentState::Failed;
                st.message = reason.clone();
            });
            let status = shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // The log goes first, so that when the master sees `failed` the log is there.
            if let Ok(text) = std::fs::read(&log_file) {
                let _ = spool.write_atomic(&log_path(&lease.job), &text);
            }
            let _ = heartbeat(spool, lease, &status);
            bail!("{reason}")
        }
    }
}

/// How often an interrupted upload is resumed before the job fails.
const UPLOAD_RETRIES: u32 = 6;

/// Uploads the image, and after a cut (link drop, sshd restart) reconnects
/// and resumes: the chunks the server holds whole are not sent again.
#[allow(clippy::too_many_arguments)]
fn upload_resuming(
    opts: &RunOptions,
    server: &Server,
    spool: &SftpSpool,
    lease: &Lease,
    image: &Path,
    manifest: &kiln_spool::manifest::ImageManifest,
    log_file: &Path,
    shared: &Shared,
    log: &JobLog,
    watch_stop: &dyn Fn(),
) -> Result<kiln_spool::agent::uploader::UploadReport> {
    let mut fresh: Option<SftpSpool> = None;
    let mut retry = 0;
    loop {
        let fs = fresh.as_ref().unwrap_or(spool);
        let result = upload(
            fs,
            lease,
            image,
            manifest,
            Some(log_file),
            &opts.upload,
            &mut |p| {
                watch_stop();
                shared.set(|st| st.progress = p.fraction());
            },
        );
        let e = match result {
            Ok(report) => {
                if retry > 0 {
                    log.line(&format!(
                        "upload resumed: {} chunks sent, {} already held",
                        report.sent, report.skipped
                    ));
                }
                return Ok(report);
            }
            Err(e) if e.is_lease_lost() || retry >= UPLOAD_RETRIES => return Err(e.into()),
            Err(e) => e,
        };
        retry += 1;
        let wait = Duration::from_secs(1 << retry.min(4));
        log.line(&format!(
            "upload interrupted: {e}; resuming in {}s (try {retry} of {UPLOAD_RETRIES})",
            wait.as_secs()
        ));
        shared.set(|st| st.message = format!("upload interrupted, resuming (try {retry})"));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if shared.abort.load(Ordering::SeqCst) {
                bail!("stopped while resuming the upload");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        fresh = connect(opts, server).ok();
    }
}

/// The job file, checked against the hash the job list pins before it is parsed.
fn download_job(spool: &SftpSpool, lease: &Lease) -> Result<(String, JobSpec)> {
    let path = job_path(&lease.job);
    let text = fetch_job(spool, lease).with_context(|| format!("downloading {path}"))?;
    let job = parse_job(&text).map_err(|e| anyhow!("{}", e.in_file(Path::new(&path))))?;
    Ok((text, job))
}

/// Downloads each payload into a cache keyed by its BLAKE3 (checked on the
/// way in) and returns a directory where the job's payload names lead to them.
fn fetch_payloads(
    opts: &RunOptions,
    spool: &SftpSpool,
    job: &JobSpec,
    job_dir: &Path,
    shared: &Shared,
    log: &JobLog,
) -> Result<PathBuf> {
    let cache = opts.work_dir.join("cache");
    let by_name = job_dir.join("payloads");
    let _ = std::fs::remove_dir_all(&by_name);
    for (i, p) in job.payloads.iter().enumerate() {
        shared.set(|st| {
            st.phase = "download".into();
            st.progress = i as f32 / job.payloads.len().max(1) as f32;
            st.message = p.name.clone();
        });
        let want = p
            .blake3
            .as_deref()
            .ok_or_else(|| anyhow!("payloads[{i}] {:?} has no pinned blake3", p.name))?;
        let cached = cache.join(want);
        if cached.exists() {
            log.line(&format!("payload {} from the cache ({want})", p.name));
        } else {
            let src = payload_path(&p.name);
            let tmp = cache.join(format!(".{want}.part"));
            let got = download_hashed(spool, &src, &tmp, &shared.abort)
                .with_context(|| format!("downloading {src}"))?;
            if got != want {
                let _ = std::fs::remove_file(&tmp);
                bail!(
                    "payloads[{i}] {:?}: BLAKE3 is {got}, the job pins {want}",
                    p.name
                );
            }
            std::fs::rename(&tmp, &cached)
                .with_context(|| format!("caching {}", cached.display()))?;
            log.line(&format!("payload {} downloaded ({want})", p.name));
        }
        let link = by_name.join(&p.name);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::os::unix::fs::symlink(&cached, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    std::fs::create_dir_all(&by_name).with_context(|| format!("creating {}", by_name.display()))?;
    Ok(by_name)
}

fn download_hashed(spool: &SftpSpool, src: &str, dst: &Path, abort: &AtomicBool) -> Result<String> {
    let mut r = spool.open_read(src)?;
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?,
    );
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if abort.load(Ordering::SeqCst) {
            bail!("aborted");
        }
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(h.finalize().to_hex().to_string())
}

/// The agent's id when the config gives none: from the first wired NIC's
/// MAC address, else the DMI serial number, else the host name.
pub fn default_agent_id() -> String {
    let mut macs: Vec<(String, String)> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = std::fs::read_to_string(e.path().join("address"))
                .ok()?
                .trim()
                .to_string();
            (name != "lo" && !mac.is_empty() && mac != "00:00:00:00:00:00").then_some((name, mac))
        })
        .collect();
    macs.sort();
    if let Some((_, mac)) = macs.first() {
        return format!("mac-{}", mac.replace(':', ""));
    }
    let sanitize = |s: &str| -> String {
        s.trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(48)
            .collect()
    };
    if let Ok(serial) = std::fs::read_to_string("/sys/class/dmi/id/product_serial") {
        let s = sanitize(&serial);
        if s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
            return format!("sn-{s}");
        }
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h = sanitize(&host);
    if h.is_empty() {
        "agent".into()
    } else {
        format!("host-{h}")
    }
}
