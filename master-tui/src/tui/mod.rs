//! `kiln-master tui`: the operator's console over a spool.
//!
//! One owner of state: terminal events, spool reads and ticks become a
//! [`Msg`]; [`update`] changes the [`App`] and makes spool changes through the
//! same protocol functions as the CLI; [`view`] draws and changes nothing.

mod app;
mod msg;
mod spool_state;
mod spool_watch;
mod terminal;
mod update;
mod view;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_spool::spool::JOB_LIST;
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

pub use app::{App, Confirm, Mode, Note, Pane};
pub use msg::{Effect, Msg};
pub use spool_state::{AgentRow, Detail, ImageRow, SpoolState, STALE_AFTER_SECS};
pub use terminal::log_path;
pub use update::{update, EXTEND_BY, PRIORITY_STEP};
pub use view::view;

/// How often the clock (lease countdowns, ages) moves on screen.
const TICK: Duration = Duration::from_secs(1);
/// How often the background reaper runs.
const REAP_EVERY: Duration = Duration::from_secs(3);
/// Messages handled between two draws, so a flood cannot starve the screen.
const BATCH: usize = 256;

/// Runs the TUI on the spool at `spool` until the operator quits.
pub fn run(spool: &Path) -> anyhow::Result<()> {
    if !spool.join(JOB_LIST).is_file() {
        anyhow::bail!(
            "{} is not a kiln spool (it has no {JOB_LIST}); create one with `kiln-master --spool {} init`",
            spool.display(),
            spool.display()
        );
    }
    let log = log_path();
    let dispatch = terminal::log_dispatch(&log)?;
    let _log = tracing::dispatcher::set_default(&dispatch);
    tracing::info!("console started on {}", spool.display());

    let local = LocalSpool::new(spool);
    let (tx, rx) = mpsc::channel::<Msg>();
    let reader = spool_watch::SpoolReader::spawn(local.clone(), tx.clone(), dispatch.clone());
    let reaper = spool_watch::Reaper::spawn(local, tx.clone(), dispatch.clone(), REAP_EVERY);
    // In raw mode Ctrl-C arrives as a key; a signal from elsewhere (kill,
    // a closed terminal) still goes through the same orderly exit.
    let signal_tx = tx.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = signal_tx.send(Msg::Terminate);
    }) {
        tracing::warn!("cannot catch SIGINT, SIGTERM and SIGHUP: {e}");
    }
    let mut guard = terminal::TerminalGuard::enter()?;
    spawn_input(tx, dispatch);

    let mut app = App::new(spool, Timestamp::now());
    reader.request(Effect::Refresh);
    let mut next_tick = Instant::now() + TICK;
    let result = (|| {
        while !app.quit {
            if terminal::PANICKED.load(Ordering::SeqCst) {
                anyhow::bail!("a panic stopped the console; its log is {}", log.display());
            }
            guard
                .terminal
                .draw(|f| view(&app, f))
                .context("drawing the console")?;
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut batch = match rx.recv_timeout(wait) {
                Ok(m) => vec![m],
                Err(RecvTimeoutError::Timeout) => vec![],
                Err(RecvTimeoutError::Disconnected) => break,
            };
            batch.extend(rx.try_iter().take(BATCH));
            if Instant::now() >= next_tick {
                batch.push(Msg::Tick(Timestamp::now()));
                next_tick = Instant::now() + TICK;
            }
            for msg in batch {
                for effect in update(&mut app, msg) {
                    reader.request(effect);
                }
                if app.quit {
                    break;
                }
            }
        }
        Ok(())
    })();
    drop(guard);
    reaper.stop(Duration::from_secs(5));
    tracing::info!("console closed");
    result
}

/// Reads terminal events on their own thread, so the UI thread only ever
/// waits on one channel.
fn spawn_input(tx: Sender<Msg>, dispatch: tracing::Dispatch) {
    std::thread::Builder::new()
        .name("terminal-input".into())
        .spawn(move || {
            let _log = tracing::dispatcher::set_default(&dispatch);
            loop {
                match crossterm::event::read() {
                    Ok(ev) => {
                        if let Some(msg) = Msg::from_event(ev) {
                            if tx.send(msg).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!("reading the terminal: {e}");
                        return;
                    }
                }
            }
        })
        .expect("spawning the terminal input thread");
}

/// Does `effects` at once on this thread, feeding the results back through
/// `update` until nothing is left to read: how tests and the benchmark drive
/// the console without threads, at the app's own `now`.
pub fn settle(app: &mut App, effects: Vec<Effect>) {
    let mut queue: VecDeque<Effect> = effects.into();
    // Each refresh asks for one detail load at most, so this always ends;
    // the bound only guards against a future loop.
    for _ in 0..64 {
        let Some(effect) = queue.pop_front() else {
            return;
        };
        let msg = spool_watch::perform(&app.spool, &effect, app.now);
        queue.extend(update(app, msg));
    }
}
