//! The job this agent holds: its workspace (log, mount points, image), its
//! heartbeat, and the work from download to upload.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_spool::agent::claim::heartbeat;
use kiln_spool::agent_config::Server;
use kiln_spool::job::JobKind;
use kiln_spool::lease::Lease;
use kiln_spool::sftp::SftpSpool;
use kiln_spool::spool::{log_path, SpoolFs};
use kiln_spool::status::{AgentState, Status};
use kiln_spool::time::Timestamp;

use super::deploy::deploy_job;
use super::download::{download_job, ServerPayloads};
use super::heartbeat::{heartbeats, Beat};
use super::upload::build_and_upload;
use super::{connect, RunOptions};
use crate::build::phase_time;
use crate::joblog::JobLog;
use crate::progress::{Event, EventKind, Phase, ProgressLine};
use crate::BuildRequest;

/// A claimed job and everything the agent keeps for it while it holds it.
pub(super) struct HeldJob<'a> {
    pub opts: &'a RunOptions,
    pub server: &'a Server,
    pub spool: &'a SftpSpool,
    pub lease: &'a Lease,
    stop: &'a AtomicBool,
    pub beat: Beat,
    pub log: JobLog,
    /// The job's workspace under the agent's work dir.
    pub dir: PathBuf,
    say: RefCell<&'a mut dyn FnMut(&str)>,
    console: RefCell<ProgressLine>,
}

/// How often a phase's progress line is printed on the console.
const CONSOLE_EVERY: Duration = Duration::from_secs(5);

impl<'a> HeldJob<'a> {
    fn open(
        opts: &'a RunOptions,
        server: &'a Server,
        spool: &'a SftpSpool,
        lease: &'a Lease,
        stop: &'a AtomicBool,
        say: &'a mut dyn FnMut(&str),
    ) -> Result<Self> {
        let now = Timestamp::now();
        let beat = Beat::new(Status {
            job: lease.job.clone(),
            agent: opts.agent_id.clone(),
            token: lease.token.clone(),
            server: server.address.clone(),
            state: AgentState::Building,
            phase: Phase::Download,
            progress: 0.0,
            bytes_done: 0,
            bytes_total: 0,
            message: String::new(),
            started: now,
            updated: now,
        });
        let dir = opts.work_dir.join("jobs").join(&lease.job);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_file = dir.join("job.log");
        let log = JobLog::create(&log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        log.line(&format!(
            "agent {} holds {} (token {}, attempt {})",
            opts.agent_id, lease.job, lease.token, lease.attempt
        ));
        Ok(HeldJob {
            opts,
            server,
            spool,
            lease,
            stop,
            beat,
            log,
            dir,
            say: RefCell::new(say),
            console: RefCell::new(ProgressLine::new(CONSOLE_EVERY, Instant::now())),
        })
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("job.log")
    }

    fn image(&self) -> PathBuf {
        self.dir.join(format!("{}.raw.zst", self.lease.job))
    }

    /// Turns the agent's stop flag into the job's abort flag.
    pub fn watch_stop(&self) {
        if self.stop.load(Ordering::SeqCst) {
            self.beat.abort.store(true, Ordering::SeqCst);
        }
    }

    /// A new session to the job's server, after the first one dropped.
    pub fn reconnect(&self) -> Result<SftpSpool> {
        connect(self.opts, self.server)
    }

    /// Reports `done` of `total` bytes of `phase`: in the status file and,
    /// every few seconds, on the console with the throughput.
    pub fn progress(&self, phase: Phase, done: u64, total: u64) {
        let done = done.min(total);
        self.beat.set(|st| {
            st.phase = phase;
            st.bytes_done = done;
            st.bytes_total = total;
            if total > 0 {
                st.progress = (done as f64 / total as f64) as f32;
            }
        });
        let line = self
            .console
            .borrow_mut()
            .update(phase, done, total, Instant::now());
        if let Some(line) = line {
            self.say(&format!("{}: {line}", self.lease.job));
        }
    }

    fn say(&self, line: &str) {
        (self.say.borrow_mut())(line)
    }

    /// One step of the job, in the job log and on the console.
    pub fn step(&self, line: &str) {
        self.log.line(line);
        self.say(&format!("{}: {line}", self.lease.job));
    }

    /// An event of the build or the deploy: into the status, and a phase's
    /// end, its messages and its byte progress onto the console.
    pub fn on_event(&self, e: &Event) {
        self.watch_stop();
        if let EventKind::Started = e.kind {
            self.beat.set(|st| {
                st.phase = e.phase;
                st.progress = 0.0;
                st.bytes_done = 0;
                st.bytes_total = 0;
            });
        }
        match &e.kind {
            EventKind::Progress { done, total } if e.phase.counts_bytes() => {
                self.progress(e.phase, *done, *total)
            }
            EventKind::Finished { seconds } => self.say(&format!(
                "{}: {} done in {seconds:.1}s",
                self.lease.job, e.phase
            )),
            // What a step or payload is, a grown partition, a wiped table:
            // into the job log and onto the console.
            EventKind::Message(m) => self.step(&format!("{}: {m}", e.phase)),
            _ => {}
        }
        self.beat.set(|st| {
            st.phase = e.phase;
            if let Some(f) = e.fraction() {
                st.progress = f;
            }
            if let EventKind::Message(m) = &e.kind {
                st.message = m.clone();
            }
        });
    }

    /// Download, then build and upload, or deploy.
    /// The job file, before the first heartbeat, so that the first status
    /// already says whether the agent builds or deploys.
    fn download(&self) -> Result<Downloaded> {
        let started = Timestamp::now();
        let t = Instant::now();
        let (text, job) = download_job(self.spool, self.lease)?;
        let phase = phase_time(Phase::Download, started, t.elapsed().as_secs_f64());
        if job.kind == JobKind::Deploy {
            self.beat.set(|st| st.state = AgentState::Deploying);
        }
        Ok(Downloaded { text, job, phase })
    }

    fn work(&self, downloaded: Downloaded) -> Result<Done> {
        let Downloaded {
            text,
            job,
            phase: download,
        } = downloaded;
        self.watch_stop();
        if job.kind == JobKind::Deploy {
            let d = deploy_job(self, &job, download)?;
            return Ok(Done::Deployed { reboot: d.reboot });
        }
        let image = self.image();
        let mut on_event = |e: &Event| self.on_event(e);
        let mounts = self.dir.join("mnt");
        std::fs::create_dir_all(&mounts)
            .with_context(|| format!("creating {}", mounts.display()))?;
        let payloads = ServerPayloads { spool: self.spool };
        let req = BuildRequest {
            job: &job,
            job_text: &text,
            payloads: &payloads,
            disk: &self.opts.disk,
            out: &image,
            log: &self.log,
            agent_id: &self.opts.agent_id,
            work_dir: &mounts,
        };
        let report = build_and_upload(self, &req, download, &mut on_event)?;
        self.beat.set(|st| {
            st.state = AgentState::Uploaded;
            st.progress = 1.0;
            st.message = format!(
                "{} chunks sent, {} already held",
                report.sent, report.skipped
            );
        });
        Ok(Done::Built)
    }

    /// Tells the master how the job ended: the last heartbeat, and on a
    /// failure the job log first.
    fn report(&self, result: Result<Done>) -> Result<Done> {
        let job = &self.lease.job;
        if let Some(why) = self.beat.lost() {
            self.log.line(&format!("stopped: {why}"));
            self.say(&format!("{job}: stopped: {why}"));
            bail!("stopped: {why}");
        }
        match result {
            Ok(done) => {
                // The upload is complete and the master publishes it whatever
                // the status says; a link that dropped since only loses the
                // last heartbeat, so retry once on a new session and go on.
                let status = self.beat.status();
                if heartbeat(self.spool, self.lease, &status).is_err() {
                    let retried = self
                        .reconnect()
                        .and_then(|fs| Ok(heartbeat(&fs, self.lease, &status)?));
                    if let Err(e) = retried {
                        self.say(&format!("{job}: the final status was not written: {e:#}"));
                    }
                }
                Ok(done)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                self.log.line(&format!("failed: {reason}"));
                self.log.sync();
                self.beat.set(|st| {
                    st.state = AgentState::Failed;
                    st.message = reason.clone();
                });
                // The log goes first, so that when the master sees `failed` the log is there.
                if let Ok(text) = std::fs::read(self.log_file()) {
                    let _ = self.spool.write_atomic(&log_path(job), &text);
                }
                let _ = heartbeat(self.spool, self.lease, &self.beat.status());
                bail!("{reason}")
            }
        }
    }
}

/// The held job's file, parsed, and how long it took to fetch.
struct Downloaded {
    text: String,
    job: kiln_spool::job::JobSpec,
    phase: kiln_spool::manifest::PhaseTime,
}

/// How a held job ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    /// Built and uploaded: the master publishes it.
    Built,
    /// Deployed and reported; `reboot` when the job asks to boot it now.
    Deployed { reboot: bool },
}

/// Holds `lease` until its job is uploaded, deployed or failed; the
/// heartbeat thread runs alongside.
pub(super) fn do_job(
    opts: &RunOptions,
    server: &Server,
    spool: &SftpSpool,
    lease: &Lease,
    stop: &AtomicBool,
    say: &mut dyn FnMut(&str),
) -> Result<Done> {
    let held = HeldJob::open(opts, server, spool, lease, stop, say)?;
    let downloaded = match held.download() {
        Ok(d) => d,
        Err(e) => return held.report(Err(e)),
    };
    let result = std::thread::scope(|s| {
        s.spawn(|| heartbeats(opts, server, lease, &held.beat));
        let r = held.work(downloaded);
        held.beat.finish();
        r
    });
    held.report(result)
}
