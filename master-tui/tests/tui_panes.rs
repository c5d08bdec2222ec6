//! Each pane of the console rendered with ratatui's TestBackend at 80x24 and
//! 160x48 from a spool with a job in every state, compared with snapshots.

mod tui_fixture;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kiln_master::tui::{settle, update, view, App, Msg, Pane};
use ratatui::backend::TestBackend;
use ratatui::style::Color;
use ratatui::Terminal;

fn render(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| view(app, f)).unwrap();
    terminal
}

fn screen(app: &App, width: u16, height: u16) -> String {
    render(app, width, height).backend().to_string()
}

fn press(app: &mut App, code: KeyCode) {
    let effects = update(app, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
    settle(app, effects);
}

fn fixture() -> (tempfile::TempDir, App) {
    let dir = tempfile::tempdir().unwrap();
    tui_fixture::build(dir.path());
    let mut app = tui_fixture::console(dir.path());
    // The leased job: it has a lease, a heartbeat and a log.
    assert!(app.select_job("build-04"));
    settle(
        &mut app,
        vec![kiln_master::tui::Effect::LoadDetail("build-04".into())],
    );
    (dir, app)
}

fn focused(pane: Pane) -> (tempfile::TempDir, App) {
    let (dir, mut app) = fixture();
    app.focus = pane;
    (dir, app)
}

#[test]
fn jobs_pane() {
    let (_d, app) = focused(Pane::Jobs);
    let small = screen(&app, 80, 24);
    for id in [
        "db-02",
        "build-04",
        "upload-05",
        "web-01",
        "cache-03",
        "cancel-09",
        "failed-08",
        "bad-07",
        "done-06",
    ] {
        assert!(small.contains(id), "{id} missing at 80x24:\n{small}");
    }
    insta::assert_snapshot!("jobs_80x24", small);
    insta::assert_snapshot!("jobs_160x48", screen(&app, 160, 48));
}

#[test]
fn agents_pane() {
    let (_d, app) = focused(Pane::Agents);
    let small = screen(&app, 80, 24);
    assert!(
        small.contains("STALE"),
        "agent-b's old heartbeat is flagged:\n{small}"
    );
    insta::assert_snapshot!("agents_80x24", small);
    insta::assert_snapshot!("agents_160x48", screen(&app, 160, 48));
}

#[test]
fn images_pane() {
    let (_d, app) = focused(Pane::Images);
    let small = screen(&app, 80, 24);
    assert!(small.contains("done-06"), "{small}");
    // 4 MiB of disk data in a 40,000-byte image.
    assert!(small.contains("104.9x"), "{small}");
    insta::assert_snapshot!("images_80x24", small);
    insta::assert_snapshot!("images_160x48", screen(&app, 160, 48));
}

#[test]
fn detail_pane() {
    let (_d, app) = focused(Pane::Detail);
    let small = screen(&app, 80, 24);
    assert!(
        small.contains("payloads: base.tar 40%"),
        "the log's tail:\n{small}"
    );
    insta::assert_snapshot!("detail_80x24", small);
    insta::assert_snapshot!("detail_160x48", screen(&app, 160, 48));
}

#[test]
fn help_confirm_prompt_and_log() {
    let (_d, mut app) = fixture();
    press(&mut app, KeyCode::Char('?'));
    insta::assert_snapshot!("help_80x24", screen(&app, 80, 24));
    press(&mut app, KeyCode::Esc);
    press(&mut app, KeyCode::Char('R'));
    insta::assert_snapshot!("confirm_reclaim_80x24", screen(&app, 80, 24));
    press(&mut app, KeyCode::Char('n'));
    press(&mut app, KeyCode::Char('a'));
    for c in "jobs/new.toml".chars() {
        press(&mut app, KeyCode::Char(c));
    }
    insta::assert_snapshot!("add_prompt_80x24", screen(&app, 80, 24));
    press(&mut app, KeyCode::Esc);
    press(&mut app, KeyCode::Char('l'));
    insta::assert_snapshot!("log_80x24", screen(&app, 80, 24));
}

#[test]
fn filter_narrows_every_list() {
    let (_d, mut app) = fixture();
    press(&mut app, KeyCode::Char('/'));
    for c in "agent-a".chars() {
        press(&mut app, KeyCode::Char(c));
    }
    press(&mut app, KeyCode::Enter);
    let ids: Vec<&str> = app
        .job_rows
        .iter()
        .map(|&i| app.state.jobs[i].id.as_str())
        .collect();
    assert_eq!(ids, ["build-04"]);
    insta::assert_snapshot!("filtered_160x48", screen(&app, 160, 48));
}

/// The countdown of a lease about to run out is red, unless NO_COLOR asks
/// for none; then it is still bold.
#[test]
fn close_lease_is_red_unless_no_color() {
    let (_d, mut app) = focused(Pane::Jobs);
    let find_left = |t: &Terminal<TestBackend>| {
        let buf = t.backend().buffer();
        let width = buf.area.width;
        let y = (0..buf.area.height)
            .find(|&y| {
                (0..width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .contains("build-04     ")
            })
            .expect("build-04's row");
        let line: String = (0..width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        let byte = line.find(" 1m00s").expect("60 s left");
        let x = line[..byte].chars().count() as u16 + 1;
        buf[(x, y)].clone()
    };
    let cell = find_left(&render(&app, 160, 48));
    assert_eq!(cell.fg, Color::Red);
    app.color = false;
    let cell = find_left(&render(&app, 160, 48));
    assert_eq!(cell.fg, Color::Reset);
    assert!(cell.modifier.contains(ratatui::style::Modifier::BOLD));
}

/// Ticks move the countdown without reading the spool.
#[test]
fn ticks_count_the_lease_down() {
    let (_d, mut app) = focused(Pane::Jobs);
    assert!(screen(&app, 160, 48).contains(" 1m00s"));
    let effects = update(
        &mut app,
        Msg::Tick(kiln_spool::time::Timestamp(tui_fixture::NOW.0 + 75)),
    );
    assert!(effects.is_empty());
    assert!(screen(&app, 160, 48).contains("-15s"));
}

#[test]
fn provenance_pane_flags_a_manifest_changed_after_signing() {
    let dir = tempfile::tempdir().unwrap();
    tui_fixture::build(dir.path());
    let manifest = dir.path().join("images/done-06/manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("OptiPlex 7090"));
    std::fs::write(&manifest, text.replace("OptiPlex 7090", "OptiPlex 7091")).unwrap();
    let mut app = tui_fixture::console(dir.path());
    app.focus = Pane::Images;
    let shown = screen(&app, 160, 48);
    for want in [
        "provenance of done-06",
        "signer   ✗ does not verify SHA256:QgLCf0YaxmnCxz2e6Gac",
        "Dell Inc. OptiPlex 7091",
        "Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz × 16",
        "eno1 d8:9e:f3:1a:2b:3c",
        "capture          140.0s",
    ] {
        assert!(shown.contains(want), "{want:?} missing:\n{shown}");
    }
    insta::assert_snapshot!("provenance_tampered_160x48", shown);
}
