//! The console's writer: every change the operator asks for (priority,
//! order, cancel, requeue, reclaim, extend, add) runs here, one at a time in
//! the order asked, under the masters' lock, as the CLI does. The reaper holds
//! that lock for a whole pass, publish included, so the UI thread never takes
//! it: it queues a [`Change`] and gets the outcome back as a [`Msg`].

use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_spool::job::MAX_PRIORITY;
use kiln_spool::master::{self, MasterError};
use kiln_spool::queue::{read_job_list, EntryState};
use kiln_spool::time::{format_secs, Timestamp};
use kiln_spool::LocalSpool;

use super::msg::Msg;

/// How far `+` and `-` move a job's priority.
pub const PRIORITY_STEP: u32 = 10;
/// How far `e` pushes a lease's deadline.
pub const EXTEND_BY: Duration = Duration::from_secs(10 * 60);

/// A change to the spool the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Raise (`up`) or lower a job's priority by [`PRIORITY_STEP`].
    Priority {
        id: String,
        up: bool,
    },
    /// Move a job before the previous one in the queue (`up`) or after the next.
    Shift {
        id: String,
        up: bool,
    },
    Cancel(String),
    Requeue(String),
    Reclaim(String),
    /// Push the lease's deadline back by [`EXTEND_BY`].
    Extend(String),
    /// Add the job file at `path`; `input` is what the operator typed.
    Add {
        input: String,
        path: PathBuf,
    },
}

impl Change {
    /// What is being done, for the status line while it waits its turn.
    pub fn doing(&self) -> String {
        match self {
            Change::Priority { id, up: true } => format!("raising the priority of {id}"),
            Change::Priority { id, up: false } => format!("lowering the priority of {id}"),
            Change::Shift { id, up: true } => format!("moving {id} up"),
            Change::Shift { id, up: false } => format!("moving {id} down"),
            Change::Cancel(id) => format!("cancelling {id}"),
            Change::Requeue(id) => format!("requeueing {id}"),
            Change::Reclaim(id) => format!("reclaiming the lease on {id}"),
            Change::Extend(id) => format!("extending the lease on {id}"),
            Change::Add { path, .. } => format!("adding {}", path.display()),
        }
    }
}

/// Makes one change at `now` under the masters' lock, waiting for the lock as
/// long as it takes, and returns the message that reports it.
pub fn apply(spool: &LocalSpool, change: &Change, now: Timestamp) -> Msg {
    let changed =
        |f: &dyn Fn(&LocalSpool) -> Result<String, MasterError>| Msg::Changed(locked(spool, f));
    match change {
        Change::Priority { id, up } => changed(&|s| priority(s, id, *up)),
        Change::Shift { id, up } => changed(&|s| {
            Ok(match master::shift(s, id, *up)? {
                Some(p) => format!(
                    "moved {id} {} (priority {p})",
                    if *up { "up" } else { "down" }
                ),
                None => format!(
                    "{id} is already the {} queued job",
                    if *up { "first" } else { "last" }
                ),
            })
        }),
        Change::Cancel(id) => changed(&|s| {
            master::cancel(s, id, now)?;
            Ok(format!("cancelled {id}"))
        }),
        Change::Requeue(id) => changed(&|s| {
            master::requeue(s, id, now)?;
            Ok(format!("requeued {id}"))
        }),
        Change::Reclaim(id) => changed(&|s| {
            Ok(match master::reclaim(s, id, now)? {
                EntryState::Queued => format!("reclaimed the lease on {id}; it is queued again"),
                EntryState::Failed => {
                    format!("reclaimed the lease on {id}; no attempts left, failed")
                }
                other => format!("reclaimed the lease on {id}; it is {other:?}").to_lowercase(),
            })
        }),
        Change::Extend(id) => changed(&|s| {
            let lease = master::extend(s, id, EXTEND_BY, now)?;
            Ok(format!(
                "extended the lease on {id} by {} to {}",
                format_secs(EXTEND_BY.as_secs() as i64),
                lease.deadline
            ))
        }),
        Change::Add { input, path } => Msg::Added {
            input: input.clone(),
            result: add(spool, path, now),
        },
    }
}

fn locked<T>(
    spool: &LocalSpool,
    change: impl FnOnce(&LocalSpool) -> Result<T, MasterError>,
) -> Result<T, String> {
    let _lock = spool.lock().map_err(|e| {
        format!(
            "taking the masters' lock in {}: {e}",
            spool.root().display()
        )
    })?;
    change(spool).map_err(|e| e.to_string())
}

fn priority(spool: &LocalSpool, id: &str, up: bool) -> Result<String, MasterError> {
    // Read under the lock: the CLI may have changed it since the console's
    // last read.
    let list = read_job_list(spool)?;
    let old = list
        .get(id)
        .ok_or_else(|| MasterError::NoSuchJob(id.into()))?
        .priority;
    let new = if up {
        old.saturating_add(PRIORITY_STEP).min(MAX_PRIORITY)
    } else {
        old.saturating_sub(PRIORITY_STEP)
    };
    if new == old {
        return Ok(format!("{id} is already at priority {old}"));
    }
    master::set_priority(spool, id, new)?;
    Ok(format!("{id}: priority {old} -> {new}"))
}

/// Reads the job file (it may sit on a slow mount, so not on the UI thread
/// either) and adds it: the new job's id and priority.
fn add(
    spool: &LocalSpool,
    path: &std::path::Path,
    now: Timestamp,
) -> Result<(String, u32), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let entry = locked(spool, |spool| master::add_job(spool, &text, path, now))?;
    Ok((entry.id, entry.priority))
}

/// The writer thread and its queue.
pub struct SpoolWriter {
    requests: Option<Sender<Change>>,
    thread: Option<JoinHandle<()>>,
}

impl SpoolWriter {
    pub fn spawn(spool: LocalSpool, out: Sender<Msg>, dispatch: tracing::Dispatch) -> SpoolWriter {
        let (tx, rx) = mpsc::channel::<Change>();
        let thread = thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                for change in rx {
                    let t = Instant::now();
                    let msg = apply(&spool, &change, Timestamp::now());
                    tracing::debug!("{} took {:?}", change.doing(), t.elapsed());
                    if out.send(msg).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the spool writer thread");
        SpoolWriter {
            requests: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues a change after those already asked for.
    pub fn request(&self, change: Change) {
        if let Some(tx) = &self.requests {
            let _ = tx.send(change);
        }
    }

    /// Lets the queued changes finish, waiting at most `patience`: a change
    /// cut off at exit leaves the spool consistent (each step is an atomic
    /// rename), one that finishes is what the operator asked for.
    pub fn stop(mut self, patience: Duration) {
        drop(self.requests.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        if !super::spool_watch::join_within(thread, patience) {
            tracing::warn!("leaving queued changes undone at exit: the masters' lock stayed taken");
        }
    }
}
