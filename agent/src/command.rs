//! Runs the few external tools the agent uses (mke2fs, mkfs.vfat, mkswap):
//! logs the argv, keeps the output in the job log and puts the tail of
//! stderr into the error.

use std::process::{Command, Stdio};

use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;

pub fn run(cmd: &mut Command, log: &JobLog) -> Result<()> {
    let argv = describe(cmd);
    log.line(&format!("$ {argv}"));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running {argv}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stdout.trim().is_empty() {
        log.line(stdout.trim_end());
    }
    if !stderr.trim().is_empty() {
        log.line(stderr.trim_end());
    }
    if out.status.success() {
        return Ok(());
    }
    let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join("; ");
    Err(Error::Failed(format!(
        "{argv} failed ({}): {tail}",
        out.status
    )))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
