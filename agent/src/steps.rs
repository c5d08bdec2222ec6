//! The job's steps: `/bin/sh -c` chrooted in the target (with /proc, /sys
//! and /dev inside) or in the agent with `KILN_TARGET` set. Each has a time
//! limit; its output goes to the job log line by line.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_spool::job::{Step, StepPlace};

use crate::disk::mount::Mount;
use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// /proc, /sys and /dev of the target, mounted while target steps run.
pub struct PseudoMounts {
    // Dropped in reverse order of mounting.
    mounts: Vec<Mount>,
}

impl PseudoMounts {
    pub fn new(target: &Path) -> Result<PseudoMounts> {
        let mut mounts = Vec::new();
        for (dir, how) in [("proc", "proc"), ("sys", "sysfs"), ("dev", "bind")] {
            let at = target.join(dir);
            std::fs::create_dir_all(&at).ctx(|| format!("creating {}", at.display()))?;
            let m = if how == "bind" {
                Mount::bind(Path::new("/dev"), &at)?
            } else {
                Mount::new(Path::new(how), &at, how)?
            };
            mounts.push(m);
        }
        Ok(PseudoMounts { mounts })
    }
}

impl Drop for PseudoMounts {
    fn drop(&mut self) {
        while let Some(m) = self.mounts.pop() {
            drop(m);
        }
    }
}

/// Runs one step to completion, its time limit or the abort flag.
pub fn run_step(
    step: &Step,
    target: &Path,
    job_id: &str,
    log: &JobLog,
    abort: &AtomicBool,
) -> Result<()> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&step.run)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("KILN_JOB", job_id)
        .env("KILN_STEP", &step.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match step.place {
        StepPlace::Target => {
            let root =
                std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| {
                    Error::Failed(format!("target path {} holds NUL", target.display()))
                })?;
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
        }
        StepPlace::Agent => {
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
        }
    }
    let where_ = match step.place {
        StepPlace::Target => "chrooted in the target",
        StepPlace::Agent => "in the agent",
    };
    log.line(&format!("step {:?} ({where_}): {}", step.name, step.run));
    let mut child = cmd
        .spawn()
        .ctx(|| format!("starting step {:?}", step.name))?;
    let mut readers = Vec::new();
    for (stream, tag) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            "out",
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            "err",
        ),
    ] {
        if let Some(s) = stream {
            let log = log.clone();
            let name = step.name.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(s).split(b'\n').map_while(|l| l.ok()) {
                    log.line(&format!("{name} {tag}| {}", String::from_utf8_lossy(&line)));
                }
            }));
        }
    }
    let limit = step.time_limit.as_duration();
    let deadline = Instant::now() + limit;
    let pgid = child.id() as libc::pid_t;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .ctx(|| format!("waiting for step {:?}", step.name))?
        {
            break Ok(st);
        }
        if abort.load(Ordering::Relaxed) {
            break Err(Error::Aborted);
        }
        if Instant::now() >= deadline {
            break Err(Error::Failed(format!(
                "step {:?} ran over its time limit of {}",
                step.name, step.time_limit
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_err() {
        // SAFETY: kill on the step's own process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    } else {
        // Leftover background processes of the step must not keep the
        // target busy.
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    for r in readers {
        let _ = r.join();
    }
    let st = status?;
    if !st.success() {
        return Err(Error::Failed(format!("step {:?} failed ({st})", step.name)));
    }
    log.line(&format!("step {:?} done", step.name));
    Ok(())
}
