//! `kiln-agent run`: ask each job server in turn for the highest-priority
//! job nobody holds, claim it, build it, upload the image, and go on.
//!
//! One file per job: this poll loop, [`job`] the held job and its
//! workspace, [`heartbeat`] the status thread, [`download`] the job and its
//! payloads, [`upload`] the image, [`deploy`] a deploy job's image onto the
//! disk.

mod deploy;
mod download;
mod heartbeat;
mod identity;
mod job;
mod upload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_spool::agent::claim::claim_next;
use kiln_spool::agent::uploader::UploadOptions;
use kiln_spool::agent_config::{AgentConfig, Server};
use kiln_spool::sftp::{SessionOptions, SftpSpool};
use kiln_spool::time::Timestamp;

pub use identity::default_agent_id;

/// What `run` needs besides the config.
pub struct RunOptions {
    pub config: AgentConfig,
    pub agent_id: String,
    /// The disk to build on (overrides the config's `disk`).
    pub disk: PathBuf,
    /// Scratch space: job logs, mount points, images. Payloads are
    /// streamed, never stored here.
    pub work_dir: PathBuf,
    /// Do one job (or find none) and return.
    pub once: bool,
    pub upload: UploadOptions,
    pub session: SessionOptions,
}

/// How a `--once` run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A job was done: a build uploaded, or a deploy written and reported.
    Built {
        job: String,
    },
    NothingToDo,
}

/// Runs jobs until `stop` is raised (or, with `once`, after one).
pub fn run(opts: &RunOptions, stop: &AtomicBool, say: &mut dyn FnMut(&str)) -> Result<Outcome> {
    if opts.config.servers.is_empty() {
        bail!("the agent config names no [[servers]]");
    }
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

/// Whether a deploy job that asks for it ends with a reboot: only when the
/// agent is the machine's init, never in a test or on an operator's shell.
static REBOOT_AFTER_DEPLOY: AtomicBool = AtomicBool::new(false);

/// Called by PID 1's run loop: a deploy job with `reboot = true` then
/// boots the deployed system instead of asking for more work.
pub fn reboot_after_deploy(yes: bool) {
    REBOOT_AFTER_DEPLOY.store(yes, Ordering::SeqCst);
}

/// Syncs and reboots (RB_AUTOBOOT) when the agent is the machine's init;
/// otherwise says so and returns. Returns as well if the reboot fails.
fn reboot_into_deployed(say: &mut dyn FnMut(&str)) {
    if !REBOOT_AFTER_DEPLOY.load(Ordering::SeqCst) {
        say("the job asks for a reboot; the agent is not the machine's init, so it goes on");
        return;
    }
    say("rebooting into the deployed system");
    nix::unistd::sync();
    // reboot(2) returns only when it failed.
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    say(&format!("reboot: {e}; asking for more work instead"));
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
    // An upload this agent was streaming when it stopped comes first.
    if let Some(job) = upload::take_up(opts, server, &spool, say)? {
        return Ok(Some(job));
    }
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
    match job::do_job(opts, server, &spool, &lease, stop, say) {
        Ok(job::Done::Built) => {
            say(&format!("{job}: uploaded; the master publishes it"));
            Ok(Some(job))
        }
        Ok(job::Done::Deployed { reboot }) => {
            say(&format!("{job}: deployed; the master records it"));
            if reboot {
                drop(spool);
                reboot_into_deployed(say);
            }
            Ok(Some(job))
        }
        Err(e) => {
            let reason = format!("{e:#}");
            say(&format!("{job}: failed: {reason}"));
            Err(JobFailed { job, reason }.into())
        }
    }
}
