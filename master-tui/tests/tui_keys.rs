//! Key handling: each action changes the spool as the CLI does, checked by
//! reading `jobs.toml` and the lease files back, and against the real
//! `kiln-master` binary run on an identical spool.

mod tui_fixture;

use std::path::Path;
use std::process::Command;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kiln_master::tui::{settle, update, App, Mode, Msg, Pane};
use kiln_spool::lease::read_lease;
use kiln_spool::master::job_view;
use kiln_spool::queue::read_job_list;
use kiln_spool::queue::{EntryState, JobList};
use kiln_spool::spool::{lease_path, JOB_LIST};
use kiln_spool::{LocalSpool, SpoolFs};

fn key(app: &mut App, code: KeyCode) {
    let effects = update(app, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
    settle(app, effects);
}

fn keys(app: &mut App, text: &str) {
    for c in text.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn fixture() -> (tempfile::TempDir, App) {
    let dir = tempfile::tempdir().unwrap();
    tui_fixture::build(dir.path());
    let app = tui_fixture::console(dir.path());
    (dir, app)
}

fn on(app: &mut App, id: &str) {
    assert!(app.select_job(id), "{id} is listed");
}

fn list(root: &Path) -> JobList {
    read_job_list(&LocalSpool::new(root)).unwrap()
}

fn entry(root: &Path, id: &str) -> kiln_spool::queue::Entry {
    list(root)
        .get(id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} in jobs.toml"))
}

fn ids(root: &Path) -> Vec<String> {
    list(root).jobs.into_iter().map(|e| e.id).collect()
}

/// Runs the real CLI on `spool`.
fn cli(spool: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-master"))
        .arg("--spool")
        .arg(spool)
        .args(args)
        .output()
        .expect("running kiln-master");
    assert!(
        out.status.success(),
        "kiln-master {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The job list without the lease tokens, random in each claim.
fn without_tokens(mut l: JobList) -> JobList {
    for e in &mut l.jobs {
        if let Some(lease) = &mut e.lease {
            lease.token.clear();
        }
    }
    l
}

/// The job list without lease tokens and the free-text messages, which
/// carry the time.
fn without_messages(l: JobList) -> JobList {
    let mut l = without_tokens(l);
    for e in &mut l.jobs {
        e.message.clear();
    }
    l
}

#[test]
fn plus_and_minus_change_the_priority_as_the_cli_does() {
    let (dir, mut app) = fixture();
    on(&mut app, "web-01");
    key(&mut app, KeyCode::Char('+'));
    assert_eq!(entry(dir.path(), "web-01").priority, 510);
    assert_eq!(
        app.selected().unwrap().id,
        "web-01",
        "the cursor follows the job"
    );
    assert_eq!(
        app.selected().unwrap().priority,
        510,
        "the view was read again"
    );

    let twin = tempfile::tempdir().unwrap();
    tui_fixture::build(twin.path());
    cli(twin.path(), &["priority", "web-01", "510"]);
    assert_eq!(
        without_tokens(list(dir.path())),
        without_tokens(list(twin.path()))
    );

    key(&mut app, KeyCode::Char('-'));
    key(&mut app, KeyCode::Char('-'));
    assert_eq!(entry(dir.path(), "web-01").priority, 490);
    cli(twin.path(), &["priority", "web-01", "490"]);
    assert_eq!(
        without_tokens(list(dir.path())),
        without_tokens(list(twin.path()))
    );
}

#[test]
fn shift_moves_a_job_up_and_down_the_queue() {
    let (dir, mut app) = fixture();
    let before = ids(dir.path());
    let pos = |ids: &[String], id: &str| ids.iter().position(|x| x == id).unwrap();
    assert!(pos(&before, "upload-05") < pos(&before, "web-01"));
    on(&mut app, "web-01");
    key(&mut app, KeyCode::Char('K'));
    let after = ids(dir.path());
    assert!(
        pos(&after, "web-01") < pos(&after, "upload-05"),
        "{after:?}"
    );
    assert_eq!(entry(dir.path(), "web-01").priority, 600);
    key(&mut app, KeyCode::Char('J'));
    assert_eq!(ids(dir.path()), before);
}

#[test]
fn cancel_asks_first_then_removes_the_lease() {
    let (dir, mut app) = fixture();
    let jobs_toml = dir.path().join(JOB_LIST);
    let untouched = std::fs::read(&jobs_toml).unwrap();
    on(&mut app, "build-04");
    key(&mut app, KeyCode::Char('c'));
    assert!(matches!(app.mode, Mode::Confirm(_)));
    key(&mut app, KeyCode::Char('n'));
    assert_eq!(std::fs::read(&jobs_toml).unwrap(), untouched, "no means no");
    assert!(dir.path().join(lease_path("build-04")).exists());

    key(&mut app, KeyCode::Char('c'));
    key(&mut app, KeyCode::Char('y'));
    assert_eq!(entry(dir.path(), "build-04").state, EntryState::Cancelled);
    assert!(
        !dir.path().join(lease_path("build-04")).exists(),
        "the holder's lease is gone"
    );
    assert_eq!(app.selected().unwrap().state.as_str(), "cancelled");

    let twin = tempfile::tempdir().unwrap();
    tui_fixture::build(twin.path());
    cli(twin.path(), &["cancel", "build-04"]);
    assert_eq!(
        without_messages(list(dir.path())),
        without_messages(list(twin.path()))
    );
}

#[test]
fn requeue_puts_a_failed_job_back_as_the_cli_does() {
    let (dir, mut app) = fixture();
    on(&mut app, "failed-08");
    key(&mut app, KeyCode::Char('r'));
    let e = entry(dir.path(), "failed-08");
    assert_eq!((e.state, e.attempts), (EntryState::Queued, 0));

    let twin = tempfile::tempdir().unwrap();
    tui_fixture::build(twin.path());
    cli(twin.path(), &["requeue", "failed-08"]);
    assert_eq!(
        without_messages(list(dir.path())),
        without_messages(list(twin.path()))
    );

    // A queued job cannot be requeued: the error is shown, nothing changes.
    let before = list(dir.path());
    on(&mut app, "web-01");
    key(&mut app, KeyCode::Char('r'));
    let note = app.note.clone().expect("a note");
    assert!(note.error && note.text.contains("requeue"), "{note:?}");
    assert_eq!(list(dir.path()), before);
}

#[test]
fn reclaim_asks_then_ends_the_lease_and_counts_the_attempt() {
    let (dir, mut app) = fixture();
    on(&mut app, "build-04");
    key(&mut app, KeyCode::Char('R'));
    key(&mut app, KeyCode::Esc);
    assert!(dir.path().join(lease_path("build-04")).exists());
    key(&mut app, KeyCode::Char('R'));
    key(&mut app, KeyCode::Char('y'));
    assert!(!dir.path().join(lease_path("build-04")).exists());
    let e = entry(dir.path(), "build-04");
    assert_eq!((e.state, e.attempts), (EntryState::Queued, 1));
    assert!(
        e.message.contains("reclaimed by the operator"),
        "{}",
        e.message
    );
    assert_eq!(app.selected().unwrap().state.as_str(), "queued");
}

#[test]
fn extend_pushes_the_deadline_back() {
    let (dir, mut app) = fixture();
    let spool = LocalSpool::new(dir.path());
    // The deadline is the master's, kept in jobs.toml; the lease file is the agent's.
    let deadline = || {
        job_view(&spool, "upload-05", tui_fixture::NOW)
            .unwrap()
            .deadline
            .expect("a deadline")
    };
    let before = deadline();
    let token = read_lease(&spool, "upload-05").unwrap().unwrap().token;
    on(&mut app, "upload-05");
    key(&mut app, KeyCode::Char('e'));
    assert_eq!(deadline().0, before.0 + 600);
    assert_eq!(app.selected().unwrap().deadline, Some(deadline()), "shown");
    let after = read_lease(&spool, "upload-05").unwrap().unwrap();
    assert_eq!(after.token, token, "the holder keeps its lease");
    // A queued job has no lease to extend.
    on(&mut app, "web-01");
    key(&mut app, KeyCode::Char('e'));
    assert!(app.note.as_ref().unwrap().error);
}

#[test]
fn add_job_from_a_file_with_the_error_inline() {
    let (dir, mut app) = fixture();
    let files = tempfile::tempdir().unwrap();
    let bad = files.path().join("bad.toml");
    std::fs::write(&bad, "id = \"new-10\"\npriority = 9\n").unwrap();
    let jobs_toml = std::fs::read(dir.path().join(JOB_LIST)).unwrap();

    key(&mut app, KeyCode::Char('a'));
    keys(&mut app, bad.to_str().unwrap());
    key(&mut app, KeyCode::Enter);
    match &app.mode {
        Mode::AddJob { error: Some(e), .. } => {
            assert!(e.contains("bad.toml") && e.contains("disk"), "{e}")
        }
        other => panic!("the prompt stays open with the error: {other:?}"),
    }
    assert_eq!(std::fs::read(dir.path().join(JOB_LIST)).unwrap(), jobs_toml);
    let screen = {
        let mut t = ratatui::Terminal::new(ratatui::backend::TestBackend::new(80, 24)).unwrap();
        t.draw(|f| kiln_master::tui::view(&app, f)).unwrap();
        t.backend().to_string()
    };
    assert!(
        screen.contains("missing field"),
        "the error is on screen:\n{screen}"
    );

    // Fix the path in the prompt: the good file next to it.
    let good = files.path().join("good.toml");
    std::fs::write(&good, tui_fixture::job_text("new-10", 900, "1h", 3)).unwrap();
    for _ in 0.."bad.toml".len() {
        key(&mut app, KeyCode::Backspace);
    }
    keys(&mut app, "good.toml");
    key(&mut app, KeyCode::Enter);
    assert_eq!(app.mode, Mode::Normal, "{:?}", app.note);
    assert_eq!(ids(dir.path())[0], "new-10", "priority 900 goes first");
    assert!(dir.path().join("jobs/new-10.toml").exists());
    assert_eq!(app.selected().unwrap().id, "new-10");

    key(&mut app, KeyCode::Char('a'));
    keys(&mut app, "/nonexistent/job.toml");
    key(&mut app, KeyCode::Enter);
    assert!(
        matches!(&app.mode, Mode::AddJob { error: Some(e), .. } if e.contains("reading /nonexistent/job.toml")),
        "{:?}",
        app.mode
    );
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn enter_on_an_agent_shows_its_job() {
    let (_dir, mut app) = fixture();
    app.focus = Pane::Agents;
    assert_eq!(app.selected_agent().unwrap().id, "agent-a");
    key(&mut app, KeyCode::Enter);
    assert_eq!(app.focus, Pane::Detail);
    assert_eq!(app.selected().unwrap().id, "build-04");
    let detail = app.current_detail().expect("the detail was read");
    assert_eq!(detail.log_source.as_deref(), Some("logs/build-04.log"));
}

#[test]
fn tab_cycles_panes_and_q_or_ctrl_c_quits() {
    let (_dir, mut app) = fixture();
    let mut seen = vec![app.focus];
    for _ in 0..4 {
        key(&mut app, KeyCode::Tab);
        seen.push(app.focus);
    }
    assert_eq!(
        seen,
        [
            Pane::Jobs,
            Pane::Agents,
            Pane::Images,
            Pane::Detail,
            Pane::Jobs
        ]
    );
    key(&mut app, KeyCode::BackTab);
    assert_eq!(app.focus, Pane::Detail);
    // q in the filter is text, not quit.
    key(&mut app, KeyCode::Char('/'));
    key(&mut app, KeyCode::Char('q'));
    assert!(!app.quit);
    assert_eq!(app.filter, "q");
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('q'));
    assert!(app.quit);

    let (_dir, mut app) = fixture();
    update(
        &mut app,
        Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
    );
    assert!(app.quit);
}

/// The CLI's changes show up on the next read, with the cursor kept.
#[test]
fn cli_changes_appear_on_refresh() {
    let (dir, mut app) = fixture();
    on(&mut app, "cache-03");
    cli(dir.path(), &["priority", "cache-03", "1000"]);
    settle(&mut app, vec![kiln_master::tui::Effect::Refresh]);
    assert_eq!(app.selected().unwrap().id, "cache-03");
    assert_eq!(app.job_cursor, 0, "now first in line");
    let spool = LocalSpool::new(dir.path());
    assert!(spool.exists(JOB_LIST).unwrap());
}
