//! `kiln-master tui`: the operator's console over a spool.
//!
//! One owner of state: terminal events, spool reads, the outcome of spool
//! changes and ticks become a [`Msg`]; [`update`] changes the [`App`] and asks
//! for reads and changes as [`Effect`]s, which workers do off the UI thread
//! (changes through the same spool functions as the CLI); [`view`] draws and
//! changes nothing.

mod app;
mod msg;
mod spool_state;
mod spool_watch;
mod spool_write;
mod terminal;
mod update;
mod view;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_spool::spool::JOB_LIST;
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;
use ratatui::backend::Backend;
use ratatui::Terminal;

pub use app::{App, Confirm, Mode, Note, Pane};
pub use msg::{Effect, Msg};
pub use spool_state::{AgentRow, Detail, ImageRow, SpoolState, STALE_AFTER_SECS};
pub use spool_write::{Change, EXTEND_BY, PRIORITY_STEP};
pub use terminal::log_path;
pub use update::update;
pub use view::view;

/// How often the clock (lease countdowns, ages) moves on screen.
const TICK: Duration = Duration::from_secs(1);
/// How often the background reaper runs.
const REAP_EVERY: Duration = Duration::from_secs(3);
/// Messages handled between two draws, so a flood cannot starve the screen.
const BATCH: usize = 256;
/// How long the reaper's pass and the operator's queued changes may take to
/// finish once the console has closed.
const PATIENCE_AT_EXIT: Duration = Duration::from_secs(5);

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

    let mut console = Console::start(spool, dispatch.clone());
    let reaper = spool_watch::Reaper::spawn(
        LocalSpool::new(spool),
        console.sender(),
        dispatch.clone(),
        REAP_EVERY,
    );
    // In raw mode Ctrl-C arrives as a key; a signal from elsewhere (kill,
    // a closed terminal) still goes through the same orderly exit.
    let signal_tx = console.sender();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = signal_tx.send(Msg::Terminate);
    }) {
        tracing::warn!("cannot catch SIGINT, SIGTERM and SIGHUP: {e}");
    }
    let mut guard = terminal::TerminalGuard::enter()?;
    spawn_input(console.sender(), dispatch);

    let result = (|| {
        while !console.app.quit {
            if terminal::PANICKED.load(Ordering::SeqCst) {
                anyhow::bail!("a panic stopped the console; its log is {}", log.display());
            }
            console.turn(&mut guard.terminal)?;
        }
        Ok(())
    })();
    drop(guard);
    reaper.stop(PATIENCE_AT_EXIT);
    console.stop(PATIENCE_AT_EXIT);
    tracing::info!("console closed");
    result
}

/// The console's loop, whatever terminal it draws on: the state, the one
/// channel every message arrives on, and the workers that read and change
/// the spool. The UI thread only draws, waits on that channel and runs
/// `update`; it never touches the spool, so neither a slow read nor a
/// publish holding the masters' lock can stop the screen.
pub struct Console {
    pub app: App,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    reader: spool_watch::SpoolReader,
    writer: spool_write::SpoolWriter,
    next_tick: Instant,
}

impl Console {
    /// A console on the spool at `root`, its workers started and the first
    /// read asked for; the workers log through `dispatch`.
    pub fn start(root: &Path, dispatch: tracing::Dispatch) -> Console {
        let spool = LocalSpool::new(root);
        let (tx, rx) = mpsc::channel::<Msg>();
        let reader = spool_watch::SpoolReader::spawn(spool.clone(), tx.clone(), dispatch.clone());
        let writer = spool_write::SpoolWriter::spawn(spool, tx.clone(), dispatch);
        reader.request(Effect::Refresh);
        Console {
            app: App::new(root, Timestamp::now()),
            tx,
            rx,
            reader,
            writer,
            next_tick: Instant::now() + TICK,
        }
    }

    /// Where terminal events, signals and the reaper send their messages.
    pub fn sender(&self) -> Sender<Msg> {
        self.tx.clone()
    }

    /// One turn of the loop: draw a frame, wait for messages (until the next
    /// tick at the latest), apply them and hand their effects to the workers.
    pub fn turn<B: Backend>(&mut self, terminal: &mut Terminal<B>) -> anyhow::Result<()> {
        terminal
            .draw(|f| view(&self.app, f))
            .context("drawing the console")?;
        let wait = self.next_tick.saturating_duration_since(Instant::now());
        let mut batch = match self.rx.recv_timeout(wait) {
            Ok(m) => vec![m],
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => vec![],
        };
        batch.extend(self.rx.try_iter().take(BATCH));
        if Instant::now() >= self.next_tick {
            batch.push(Msg::Tick(Timestamp::now()));
            self.next_tick = Instant::now() + TICK;
        }
        for msg in batch {
            for effect in update(&mut self.app, msg) {
                match effect {
                    Effect::Change(change) => self.writer.request(change),
                    read => self.reader.request(read),
                }
            }
            if self.app.quit {
                break;
            }
        }
        Ok(())
    }

    /// Lets the changes already asked for finish, waiting at most `patience`.
    pub fn stop(self, patience: Duration) {
        self.writer.stop(patience);
    }
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
/// `update` until nothing is left to do: how tests and the benchmark drive
/// the console without threads, at the app's own `now`.
pub fn settle(app: &mut App, effects: Vec<Effect>) {
    let mut queue: VecDeque<Effect> = effects.into();
    // Each refresh asks for one detail load at most, so this always ends;
    // the bound only guards against a future loop.
    for _ in 0..64 {
        let Some(effect) = queue.pop_front() else {
            return;
        };
        let msg = perform(&app.spool, &effect, app.now);
        queue.extend(update(app, msg));
    }
}

/// Does one effect, reading or changing the spool, and returns the message
/// that carries its result: what the workers run, and `settle` in tests.
fn perform(spool: &LocalSpool, effect: &Effect, now: Timestamp) -> Msg {
    match effect {
        Effect::Refresh => match SpoolState::load(spool, now) {
            Ok(state) => Msg::Spool(Box::new(state)),
            Err(e) => Msg::SpoolError(format!("{e:#}")),
        },
        Effect::LoadDetail(id) => Msg::Detail(Box::new(Detail::load(spool, id))),
        Effect::Change(change) => spool_write::apply(spool, change, now),
    }
}
