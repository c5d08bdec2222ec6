//! The heartbeat thread: with its own SSH session it writes the held job's
//! status well inside the lease's time limit, and raises the abort flag the
//! moment the lease is gone or someone else's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_spool::agent::claim::{heartbeat, LeaseCheck};
use kiln_spool::agent_config::Server;
use kiln_spool::lease::Lease;
use kiln_spool::sftp::SftpSpool;
use kiln_spool::status::Status;
use kiln_spool::time::Timestamp;

use super::{connect, RunOptions};

/// The holder's view of its job, shared with the heartbeat thread.
pub(super) struct Beat {
    status: Mutex<Status>,
    /// Raised when the lease is lost (or the agent stops): the build and
    /// the upload stop at their next check.
    pub abort: AtomicBool,
    lost: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Beat {
    pub fn new(status: Status) -> Self {
        Beat {
            status: Mutex::new(status),
            abort: AtomicBool::new(false),
            lost: Mutex::new(None),
            done: AtomicBool::new(false),
        }
    }

    /// Changes the status the next heartbeat writes.
    pub fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.updated = Timestamp::now();
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the heartbeat thread.
    pub fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
    }

    fn lose(&self, why: &str) {
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        self.abort.store(true, Ordering::SeqCst);
    }
}

fn heartbeat_every(lease: &Lease) -> Duration {
    let limit = lease.acquired.secs_until(lease.deadline).max(1) as u64;
    Duration::from_secs((limit / 10).clamp(1, 15))
}

/// Writes heartbeats until [`Beat::finish`] or the lease is lost.
pub(super) fn heartbeats(opts: &RunOptions, server: &Server, lease: &Lease, beat: &Beat) {
    let every = heartbeat_every(lease);
    let mut spool: Option<SftpSpool> = None;
    let mut last = Instant::now() - every;
    while !beat.done.load(Ordering::SeqCst) {
        if last.elapsed() < every {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        last = Instant::now();
        if spool.is_none() {
            spool = connect(opts, server).ok();
        }
        let Some(fs) = &spool else { continue };
        match heartbeat(fs, lease, &beat.status()) {
            Ok(LeaseCheck::Held) => {}
            Ok(LeaseCheck::Gone) => {
                return beat.lose("the lease is gone (reaped, cancelled or reclaimed)")
            }
            Ok(LeaseCheck::Replaced { by_agent }) => {
                return beat.lose(&format!("the lease now belongs to {by_agent}"))
            }
            // A dropped link is retried on the next beat with a new session.
            Err(_) => spool = None,
        }
    }
}
