//! What agents write reaches every pane escaped: a spool whose agent id,
//! phase, message, server and job log carry terminal escapes (title, clear,
//! clipboard, CR, C1 CSI, bidi overrides) leaves no control character in
//! ratatui's TestBackend buffer, whatever pane, mode or size is drawn.

mod tui_fixture;

use kiln_master::tui::{settle, update, view, App, Confirm, Effect, Mode, Msg, Pane};
use kiln_spool::master::ReapReport;
use kiln_spool::queue::EntryState;
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use tui_fixture::{EVIL_AGENT, EVIL_MESSAGE, EVIL_PHASE};

/// Characters a terminal takes as commands, or that reorder a line.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

fn render(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| view(app, f)).unwrap();
    terminal
}

/// Draws `app` at three sizes and fails on any cell holding an unsafe character.
fn assert_inert(app: &App, what: &str) {
    for (w, h) in [(160, 48), (100, 30), (80, 24)] {
        let terminal = render(app, w, h);
        let buffer = terminal.backend().buffer();
        let bad: Vec<String> = buffer
            .content()
            .iter()
            .enumerate()
            .filter(|(_, cell)| cell.symbol().chars().any(unsafe_char))
            .map(|(i, cell)| {
                let (x, y) = buffer.pos_of(i);
                format!("({x},{y}) {:?}", cell.symbol())
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{what} at {w}x{h}: control characters in cells {bad:?}"
        );
    }
}

fn screen(app: &App, width: u16, height: u16) -> String {
    render(app, width, height).backend().to_string()
}

fn hostile() -> (tempfile::TempDir, App) {
    let dir = tempfile::tempdir().unwrap();
    let spool = tui_fixture::build(dir.path());
    tui_fixture::add_hostile(&spool);
    let app = tui_fixture::console(dir.path());
    (dir, app)
}

fn show(app: &mut App, id: &str) {
    assert!(app.select_job(id), "{id} is listed");
    settle(app, vec![Effect::LoadDetail(id.into())]);
}

#[test]
fn every_pane_escapes_what_agents_wrote() {
    let (_dir, mut app) = hostile();
    for id in ["evil-11", "evil-12", "evil-13"] {
        show(&mut app, id);
        for pane in Pane::ALL {
            app.focus = pane;
            assert_inert(&app, &format!("{id} with {pane:?} focused"));
        }
        app.mode = Mode::Log { up: 0 };
        assert_inert(&app, &format!("{id}'s log"));
        app.mode = Mode::Normal;
    }

    show(&mut app, "evil-11");
    app.mode = Mode::Confirm(Confirm::Reclaim("evil-11".into()));
    assert_inert(&app, "the reclaim question, which names the holder");
    app.mode = Mode::Normal;

    // Notes quote what agents wrote: a refused change, a reaper line.
    update(
        &mut app,
        Msg::Changed(Err(format!("lease of {EVIL_AGENT}: {EVIL_MESSAGE}"))),
    );
    assert_inert(&app, "an error note");
    app.note = None;
    update(
        &mut app,
        Msg::Reaped(Ok(ReapReport {
            released: vec![(
                "evil-13".into(),
                EntryState::Failed,
                format!("{EVIL_AGENT} failed in {EVIL_PHASE}: {EVIL_MESSAGE}"),
            )],
            ..Default::default()
        })),
    );
    assert_inert(&app, "the reaper's note");

    // A paste into the filter or the add prompt.
    update(&mut app, Msg::Key(key('/')));
    update(&mut app, Msg::Paste(EVIL_PHASE.into()));
    assert_inert(&app, "a pasted filter");
    update(
        &mut app,
        Msg::Key(crossterm::event::KeyEvent::from(
            crossterm::event::KeyCode::Esc,
        )),
    );
    update(&mut app, Msg::Key(key('a')));
    update(&mut app, Msg::Paste(EVIL_MESSAGE.into()));
    assert_inert(&app, "a pasted path");
    update(
        &mut app,
        Msg::Added {
            input: EVIL_PHASE.into(),
            result: Err(format!("reading {EVIL_PHASE}: {EVIL_MESSAGE}")),
        },
    );
    assert!(matches!(app.mode, Mode::AddJob { error: Some(_), .. }));
    assert_inert(&app, "an add error");
}

fn key(c: char) -> crossterm::event::KeyEvent {
    crossterm::event::KeyEvent::from(crossterm::event::KeyCode::Char(c))
}

/// The escapes are shown, not dropped: the operator sees what the agent sent.
#[test]
fn escaped_text_stays_readable() {
    let (_dir, mut app) = hostile();
    show(&mut app, "evil-11");
    app.focus = Pane::Detail;
    let detail = screen(&app, 160, 48);
    assert!(
        detail.contains(r"evil\x1b]0;pwned\x07\u{9b}2J (attempt 1)"),
        "the agent, escaped:\n{detail}"
    );
    assert!(
        detail.contains(r"\x1b[31m10.0.0.9"),
        "the server, escaped:\n{detail}"
    );
    insta::assert_snapshot!("hostile_detail_160x48", detail);

    app.mode = Mode::Log { up: 0 };
    let log = screen(&app, 80, 24);
    for line in [
        "error: disk",
        "title gone",
        r"clip\rover",
        "cleared",
        r"        indented \u{202e}reversed",
    ] {
        assert!(log.contains(line), "{line:?} in the log:\n{log}");
    }
    insta::assert_snapshot!("hostile_log_80x24", log);
}
