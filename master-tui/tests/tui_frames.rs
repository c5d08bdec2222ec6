//! The console never freezes: while the masters' lock is held (as the reaper
//! holds it through a publish, copying and hashing a whole image), the event
//! loop keeps drawing frames as keys arrive, a write key among them; the
//! write is done once the lock is free.

mod tui_fixture;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent};
use kiln_master::tui::{Console, Msg};
use kiln_spool::queue::read_job_list;
use kiln_spool::LocalSpool;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

/// How long the lock stays held while keys are pressed.
const HELD: Duration = Duration::from_secs(2);
/// The time between two keys.
const KEY_EVERY: Duration = Duration::from_millis(20);
/// The longest the screen may go without a frame while keys arrive: well
/// under the clock's tick (1 s), which draws a frame even with no key.
const MAX_GAP: Duration = Duration::from_millis(500);
/// A holder that is never told to let go lets go after this, so that a
/// console that does freeze fails the test instead of hanging it.
const HOLDER_GIVES_UP: Duration = Duration::from_secs(8);

fn priority(spool: &LocalSpool, id: &str) -> u32 {
    read_job_list(spool).unwrap().get(id).unwrap().priority
}

/// Runs turns of the loop until `done` or `secs` pass; returns when each
/// turn's frame was drawn.
fn turns_until(
    console: &mut Console,
    terminal: &mut Terminal<TestBackend>,
    secs: u64,
    mut done: impl FnMut(&Console) -> bool,
) -> Vec<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut frames = Vec::new();
    while !done(console) {
        assert!(Instant::now() < deadline, "not done within {secs} s");
        console.turn(terminal).unwrap();
        frames.push(Instant::now());
    }
    frames
}

#[test]
fn frames_keep_coming_while_a_publish_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let spool = tui_fixture::build(dir.path());
    assert_eq!(priority(&spool, "web-01"), 500);

    // The reaper's publish, simulated: another thread holds the lock.
    let (release, released) = mpsc::channel::<()>();
    let (taken, is_taken) = mpsc::channel::<()>();
    let holder_spool = spool.clone();
    let holder = thread::spawn(move || {
        let _lock = holder_spool.lock().expect("taking the masters' lock");
        taken.send(()).unwrap();
        let _ = released.recv_timeout(HOLDER_GIVES_UP);
    });
    is_taken.recv().unwrap();

    let mut console = Console::start(dir.path(), tracing::Dispatch::none());
    let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
    turns_until(&mut console, &mut terminal, 10, |c| c.app.loaded);
    assert!(console.app.select_job("web-01"));

    // The operator presses `+` on web-01, then keeps moving the cursor.
    let keys = console.sender();
    let typist = thread::spawn(move || {
        keys.send(Msg::Key(KeyEvent::from(KeyCode::Char('+'))))
            .unwrap();
        let end = Instant::now() + HELD;
        let mut sent = 1;
        while Instant::now() < end {
            thread::sleep(KEY_EVERY);
            let code = if sent % 2 == 1 {
                KeyCode::Down
            } else {
                KeyCode::Up
            };
            keys.send(Msg::Key(KeyEvent::from(code))).unwrap();
            sent += 1;
        }
        sent
    });

    let start = Instant::now();
    let mut frames = vec![start];
    frames.extend(turns_until(&mut console, &mut terminal, 20, |_| {
        start.elapsed() >= HELD
    }));
    let sent = typist.join().unwrap();
    let gaps: Vec<Duration> = frames.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    // Keys that arrive together share a frame; a frozen loop draws none.
    assert!(
        frames.len() >= sent / 2,
        "{} frames in {HELD:?} while {sent} keys came",
        frames.len()
    );
    assert!(
        longest <= MAX_GAP,
        "the screen stood still for {longest:?} while the lock was held"
    );
    // The change waits for the lock, and says so.
    assert_eq!(priority(&spool, "web-01"), 500, "the lock was held");
    assert_eq!(console.app.pending, 1);
    let shown = terminal.backend().to_string();
    assert!(
        shown.contains("raising the priority of web-01") && shown.contains("1 pending"),
        "the status line says what waits:\n{shown}"
    );

    // The publish ends: the change goes through and its outcome shows.
    release.send(()).unwrap();
    holder.join().unwrap();
    turns_until(&mut console, &mut terminal, 10, |c| c.app.pending == 0);
    assert_eq!(priority(&spool, "web-01"), 510);
    let note = console.app.note.clone().expect("a note");
    assert_eq!(note.text, "web-01: priority 500 -> 510");
    assert!(!note.error);
    console.stop(Duration::from_secs(5));
}
