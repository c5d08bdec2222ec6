//! PID 1's console: status lines go to every active console (serial and
//! VGA, per `/sys/class/tty/console/active`), not only to `/dev/console`,
//! which is the last `console=` alone.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::unistd::Pid;

pub struct Console {
    ttys: Vec<File>,
}

impl Console {
    /// Standard output only: before /sys is mounted.
    pub fn stdout() -> Self {
        Self { ttys: Vec::new() }
    }

    /// Every active console; standard output when none opens.
    pub fn open() -> Self {
        let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
        let ttys = active_ttys(&active)
            .iter()
            .filter_map(|name| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(format!("/dev/{name}"))
                    .ok()
            })
            .inspect(blocking)
            .collect();
        Self { ttys }
    }

    /// Writes `kiln: TEXT` as one line on each console.
    pub fn line(&mut self, text: &str) {
        let line = format!("kiln: {text}\n");
        if self.ttys.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
            return;
        }
        for t in &mut self.ttys {
            let _ = t.write_all(line.as_bytes());
        }
    }
}

/// Opened non-blocking so that a serial line without carrier does not hang
/// the open; written blocking so that no status line is dropped.
fn blocking(f: &File) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// The device names in `/sys/class/tty/console/active` (`tty0 ttyS0`),
/// without repeats.
pub fn active_ttys(active: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in active.split_whitespace() {
        if !out.iter().any(|n| n == name) && !name.contains('/') {
            out.push(name.to_string());
        }
    }
    out
}

/// Starts busybox sh on /dev/console as a session leader with the console
/// as its controlling terminal, so that job control and Ctrl-C work.
pub fn rescue_shell() -> Result<Pid> {
    let tty = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .context("opening /dev/console")
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.stdin(Stdio::from(tty()?))
        .stdout(Stdio::from(tty()?))
        .stderr(Stdio::from(tty()?));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting /bin/sh")?;
    Ok(Pid::from_raw(child.id() as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_consoles_are_listed_once() {
        assert_eq!(active_ttys("tty0 ttyS0\n"), ["tty0", "ttyS0"]);
        assert_eq!(active_ttys("ttyS0 ttyS0"), ["ttyS0"]);
        assert!(active_ttys("").is_empty());
    }
}
