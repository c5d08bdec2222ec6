//! The job's steps: `/bin/sh -c` chrooted in the entered target (see
//! [`crate::chroot`]) or in the agent with `KILN_TARGET` set. Each has a
//! time limit; its output goes to the job log line by line. When a step
//! ends, whatever it left running in its process group or in the target is
//! killed, and its output is not waited for past a short grace.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_spool::job::{Step, StepPlace};
use kiln_spool::units::TimeLimit;

use crate::chroot::{kill_processes_in, Chroot};
use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a finished step's output readers are waited for: a daemon in
/// another session may hold the pipes open for ever.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Where a script runs.
pub enum Place<'a> {
    /// Chrooted into the entered target.
    Target(&'a Chroot),
    /// In the agent, with `KILN_TARGET` naming the mounted target.
    Agent { target: &'a Path },
}

/// One script to run: a step of the job, or a tool the agent runs in the
/// target (the loader's installer, the initramfs generator).
pub struct Script<'a> {
    /// Shown in the job log and errors, and `KILN_STEP`.
    pub name: &'a str,
    pub run: &'a str,
    pub time_limit: TimeLimit,
    pub job_id: &'a str,
    /// Extra environment (`KILN_DISK`, `KILN_ROOT_DEVICE`).
    pub env: &'a [(String, String)],
}

/// Runs one step of the job to completion, its time limit or the abort
/// flag. Target steps need the entered target.
pub fn run_step(
    step: &Step,
    target: &Path,
    chroot: Option<&Chroot>,
    env: &[(String, String)],
    job_id: &str,
    log: &JobLog,
    abort: &AtomicBool,
) -> Result<()> {
    let place = match (step.place, chroot) {
        (StepPlace::Target, Some(c)) => Place::Target(c),
        (StepPlace::Target, None) => {
            return Err(Error::Failed(format!(
                "step {:?} runs in the target, which is not entered",
                step.name
            )))
        }
        (StepPlace::Agent, _) => Place::Agent { target },
    };
    let script = Script {
        name: &step.name,
        run: &step.run,
        time_limit: step.time_limit,
        job_id,
        env,
    };
    let st = run_script(&script, &place, log, abort)?;
    if !st.success() {
        return Err(Error::Failed(format!("step {:?} failed ({st})", step.name)));
    }
    log.line(&format!("step {:?} done", step.name));
    Ok(())
}

/// Runs a script and returns its exit status; running over its time limit
/// or being aborted is an error. Its process group, and for the target
/// whatever runs in it, is killed when it ends.
pub fn run_script(
    script: &Script,
    place: &Place,
    log: &JobLog,
    abort: &AtomicBool,
) -> Result<ExitStatus> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script.run)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("KILN_JOB", script.job_id)
        .env("KILN_STEP", script.name)
        .envs(script.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let chroot_root = match place {
        Place::Target(c) => {
            let root =
                std::ffi::CString::new(c.root().as_os_str().as_encoded_bytes()).map_err(|_| {
                    Error::Failed(format!("target path {} holds NUL", c.root().display()))
                })?;
            cmd.env("DEBIAN_FRONTEND", "noninteractive");
            // SAFETY: between fork and exec only async-signal-safe calls are
            // made (setsid, chroot, chdir).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0
                        || libc::chroot(root.as_ptr()) != 0
                        || libc::chdir(c"/".as_ptr()) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(c.root())
        }
        Place::Agent { target } => {
            cmd.env("KILN_TARGET", target);
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            None
        }
    };
    let where_ = match place {
        Place::Target(_) => "chrooted in the target",
        Place::Agent { .. } => "in the agent",
    };
    log.line(&format!(
        "step {:?} ({where_}): {}",
        script.name, script.run
    ));
    let mut child = cmd
        .spawn()
        .ctx(|| format!("starting step {:?}", script.name))?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    for (stream, tag) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            "out",
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            "err",
        ),
    ] {
        if let Some(s) = stream {
            let log = log.clone();
            let name = script.name.to_string();
            let done = done_tx.clone();
            readers += 1;
            std::thread::spawn(move || {
                for line in BufReader::new(s).split(b'\n').map_while(|l| l.ok()) {
                    log.line(&format!("{name} {tag}| {}", String::from_utf8_lossy(&line)));
                }
                let _ = done.send(());
            });
        }
    }
    drop(done_tx);
    let limit = script.time_limit.as_duration();
    let deadline = Instant::now() + limit;
    let pgid = child.id() as libc::pid_t;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .ctx(|| format!("waiting for step {:?}", script.name))?
        {
            break Ok(st);
        }
        if abort.load(Ordering::Relaxed) {
            break Err(Error::Aborted);
        }
        if Instant::now() >= deadline {
            break Err(Error::Failed(format!(
                "step {:?} ran over its time limit of {}",
                script.name, script.time_limit
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Leftover processes of the step must not keep the target busy or hold
    // its output open.
    // SAFETY: kill on the step's own process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if status.is_err() {
        let _ = child.wait();
    }
    if let Some(root) = chroot_root {
        kill_processes_in(root);
    }
    let grace = Instant::now() + OUTPUT_GRACE;
    for _ in 0..readers {
        let left = grace.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            log.line(&format!(
                "step {:?}: a process outside its group still holds its output; not waiting for it",
                script.name
            ));
            break;
        }
    }
    status
}
