//! The console's workers: a reader that reloads the spool when it changes
//! (file notifications, with polling as the fallback) and a reaper that runs
//! the master's periodic pass. Neither ever runs on the UI thread.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_spool::master::reap_locking;
use kiln_spool::spool::{
    HISTORY, IMAGES, INCOMING, JOBS, LEASES, LOGS, MASTER_DIR, STATUS, TMP_PREFIX,
};
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;
use notify::{RecursiveMode, Watcher};

use super::msg::{Effect, Msg};
use super::perform;

/// Rereads this often even when notifications work, in case one is missed.
const POLL_WITH_NOTIFY: Duration = Duration::from_secs(5);
/// Rereads this often when notifications are not available.
const POLL_WITHOUT_NOTIFY: Duration = Duration::from_millis(700);
/// Events closer together than this are read as one change.
const SETTLE: Duration = Duration::from_millis(40);
/// The longest a burst of events can hold back a reread.
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// The spool reader thread and the watcher that wakes it.
pub struct SpoolReader {
    requests: Sender<Effect>,
    /// Kept alive for as long as the reader is; dropping it stops the events.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl SpoolReader {
    pub fn spawn(spool: LocalSpool, out: Sender<Msg>, dispatch: tracing::Dispatch) -> SpoolReader {
        let (tx, rx) = mpsc::channel::<Effect>();
        let watcher = match watch(spool.root(), tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "watching {} failed ({e}); polling every {:?} instead",
                    spool.root().display(),
                    POLL_WITHOUT_NOTIFY
                );
                None
            }
        };
        let poll = if watcher.is_some() {
            POLL_WITH_NOTIFY
        } else {
            POLL_WITHOUT_NOTIFY
        };
        thread::Builder::new()
            .name("spool-reader".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                read_loop(&spool, &rx, &out, poll);
            })
            .expect("spawning the spool reader thread");
        SpoolReader {
            requests: tx,
            _watcher: watcher,
        }
    }

    pub fn request(&self, effect: Effect) {
        let _ = self.requests.send(effect);
    }
}

/// What the reader has been asked for and not done yet.
#[derive(Default)]
struct Pending {
    refresh: bool,
    detail: Option<String>,
}

impl Pending {
    fn take(&mut self, e: Effect) {
        match e {
            Effect::Refresh => self.refresh = true,
            Effect::LoadDetail(id) => self.detail = Some(id),
            Effect::Change(change) => {
                tracing::error!("the spool reader was handed a change: {}", change.doing())
            }
        }
    }
}

fn read_loop(spool: &LocalSpool, rx: &Receiver<Effect>, out: &Sender<Msg>, poll: Duration) {
    // A big spool takes a while to read; spacing reads by as long as the
    // last one took keeps this thread under half a core while agents write.
    let mut next_read = Instant::now();
    loop {
        let mut p = Pending::default();
        match rx.recv_timeout(poll) {
            Ok(e) => p.take(e),
            Err(RecvTimeoutError::Timeout) => p.take(Effect::Refresh),
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Let a burst of changes (a publish, an agent's upload) settle so it
        // costs one read, not one per file.
        let settle_by = Instant::now() + SETTLE_MAX;
        loop {
            let now = Instant::now();
            let end = if p.refresh {
                settle_by.max(next_read)
            } else {
                settle_by
            };
            if now >= end {
                break;
            }
            match rx.recv_timeout(SETTLE.min(end - now)) {
                Ok(e) => p.take(e),
                Err(RecvTimeoutError::Timeout) if !p.refresh || Instant::now() >= next_read => {
                    break
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        if let Some(id) = p.detail {
            let msg = perform(spool, &Effect::LoadDetail(id), Timestamp::now());
            if out.send(msg).is_err() {
                return;
            }
        }
        if p.refresh {
            let t = Instant::now();
            let msg = perform(spool, &Effect::Refresh, Timestamp::now());
            let took = t.elapsed();
            tracing::debug!("reading the spool took {took:?}");
            next_read = Instant::now() + took;
            if out.send(msg).is_err() {
                return;
            }
        }
    }
}

/// Watches the spool's directories (not the uploads in progress below
/// `incoming/`, which change with every chunk written).
fn watch(root: &Path, tx: Sender<Effect>) -> notify::Result<notify::RecommendedWatcher> {
    let base = root.to_path_buf();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if ev.paths.iter().any(|p| matters(&base, p)) => {
                let _ = tx.send(Effect::Refresh);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("spool watcher: {e}"),
        })?;
    watcher.watch(root, RecursiveMode::NonRecursive)?;
    for dir in [JOBS, LEASES, STATUS, INCOMING, IMAGES, HISTORY, LOGS] {
        let path = root.join(dir);
        if path.is_dir() {
            watcher.watch(&path, RecursiveMode::NonRecursive)?;
        }
    }
    Ok(watcher)
}

/// Whether a changed path below `root` can change what the console shows:
/// not the masters' own directory (its lock is taken by every change) and
/// not temporary files (renamed into place, which is its own event).
fn matters(root: &Path, path: &Path) -> bool {
    let rel = path.strip_prefix(root).unwrap_or(path);
    if rel
        .components()
        .next()
        .is_some_and(|c| c.as_os_str() == MASTER_DIR)
    {
        return false;
    }
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.is_empty() && !name.starts_with(TMP_PREFIX)
}

/// The background reaper and publisher: one pass now, then one every `every`.
pub struct Reaper {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub fn spawn(
        spool: LocalSpool,
        out: Sender<Msg>,
        dispatch: tracing::Dispatch,
        every: Duration,
    ) -> Reaper {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                loop {
                    let t = Instant::now();
                    // The pass takes the lock only for its changes, not
                    // while it verifies and copies a large upload.
                    let result = reap_locking(&spool, &Timestamp::now).map_err(|e| e.to_string());
                    let took = t.elapsed();
                    tracing::debug!("reaper pass took {took:?}");
                    if out.send(Msg::Reaped(result)).is_err() {
                        return;
                    }
                    // On a big spool a pass is slow; never spend more than a
                    // third of the time in it.
                    match stopped.recv_timeout(every.max(took * 2)) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .expect("spawning the reaper thread");
        Reaper {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops after the pass in progress, waiting at most `patience` for it:
    /// a pass interrupted by exit is safe (publishing renames into place), a
    /// finished one is tidier.
    pub fn stop(mut self, patience: Duration) {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        if !join_within(thread, patience) {
            tracing::info!("leaving the reaper's pass unfinished at exit");
        }
    }
}

/// Joins `thread` if it ends within `patience`; false if it is still
/// running then (it is left to end with the process).
pub(super) fn join_within(thread: JoinHandle<()>, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while !thread.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if !thread.is_finished() {
        return false;
    }
    let _ = thread.join();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::agent::claim::claim_next;
    use kiln_spool::master::{add_job, init};
    use kiln_spool::queue::EntryState;
    use kiln_spool::spool::{JOB_LIST, MASTER_LOCK};
    use kiln_spool::SpoolFs;

    const JOB: &str = "id = \"seen\"\ntime_limit = \"1s\"\n[disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";

    /// Waits for the first message `pick` accepts, up to `secs`.
    fn wait_for<T>(rx: &Receiver<Msg>, secs: u64, mut pick: impl FnMut(Msg) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(msg) = rx.recv_timeout(left) {
                if let Some(t) = pick(msg) {
                    return t;
                }
            }
        }
        panic!("no such message within {secs} s");
    }

    #[test]
    fn ignores_the_masters_directory_and_temporary_files() {
        let root = Path::new("/s");
        assert!(matters(root, Path::new("/s/jobs.toml")));
        assert!(matters(root, Path::new("/s/leases/a")));
        assert!(matters(root, Path::new("/s/status/master.toml")));
        assert!(!matters(root, Path::new("/s/master")));
        assert!(!matters(root, Path::new("/s/master/lock")));
        assert!(!matters(root, Path::new("/s/.tmp.jobs.toml.12.ab")));
        assert!(!matters(root, Path::new("/s/leases/.tmp.a.12.ab")));
    }

    #[test]
    fn taking_the_lock_does_not_wake_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::new(dir.path());
        init(&spool).unwrap();
        // As in a spool from before master/: the first lock makes it.
        std::fs::remove_dir_all(spool.path(MASTER_DIR)).unwrap();
        let (tx, rx) = mpsc::channel();
        let _watcher = watch(spool.root(), tx).unwrap();
        for _ in 0..3 {
            drop(spool.lock().unwrap());
        }
        assert!(spool.path(MASTER_LOCK).exists());
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(500)),
            Err(RecvTimeoutError::Timeout),
            "a lock woke the reader"
        );
        spool.write_atomic(JOB_LIST, b"").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Effect::Refresh),
            "a change to jobs.toml wakes it"
        );
    }

    #[test]
    fn reader_sees_a_change_by_notification() {
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::new(dir.path());
        init(&spool).unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = SpoolReader::spawn(spool.clone(), tx, tracing::Dispatch::none());
        assert!(reader._watcher.is_some(), "inotify is available here");
        reader.request(Effect::Refresh);
        wait_for(&rx, 5, |m| matches!(m, Msg::Spool(_)).then_some(()));

        let t = Instant::now();
        add_job(&spool, JOB, Path::new("seen.toml"), Timestamp::now()).unwrap();
        let state = wait_for(&rx, 5, |m| match m {
            Msg::Spool(s) if !s.jobs.is_empty() => Some(s),
            _ => None,
        });
        assert_eq!(state.jobs[0].id, "seen");
        // Polling alone would take 5 s with the watcher on.
        assert!(t.elapsed() < POLL_WITH_NOTIFY, "{:?}", t.elapsed());
    }

    #[test]
    fn reaper_reclaims_an_expired_lease_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::new(dir.path());
        init(&spool).unwrap();
        add_job(&spool, JOB, Path::new("seen.toml"), Timestamp(1)).unwrap();
        // Claimed long ago with a 1 s limit, and seen by a pass then:
        // expired by now.
        claim_next(&spool, "agent-x", Timestamp(100))
            .unwrap()
            .unwrap();
        kiln_spool::master::reap(&spool, Timestamp(100)).unwrap();
        let (tx, rx) = mpsc::channel();
        let reaper = Reaper::spawn(
            spool.clone(),
            tx,
            tracing::Dispatch::none(),
            Duration::from_secs(60),
        );
        let report = wait_for(&rx, 10, |m| match m {
            Msg::Reaped(r) => Some(r.unwrap()),
            _ => None,
        });
        assert_eq!(report.released.len(), 1, "{report:?}");
        assert_eq!(report.released[0].1, EntryState::Queued);
        assert!(!spool.path("leases/seen").exists());
        reaper.stop(Duration::from_secs(5));
    }
}
