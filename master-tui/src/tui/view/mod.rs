//! `view`: draws the state and changes nothing. Big terminals get every pane
//! at once; small ones (80x24) get the focused pane under a tab line.

mod agents;
mod detail;
mod images;
mod jobs;
mod overlay;
pub mod theme;

use kiln_spool::master::JobState;
use kiln_spool::printable::printable;
use kiln_spool::time::{format_secs, Timestamp};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Paragraph};
use ratatui::Frame;

use super::app::{App, Mode, Pane};
use theme::Theme;

/// Below this size the panes take turns on the screen.
const GRID_MIN_WIDTH: u16 = 120;
const GRID_MIN_HEIGHT: u16 = 32;

pub fn view(app: &App, f: &mut Frame) {
    let theme = Theme { color: app.color };
    let [body, bar] = Layout::vertical([Constraint::Min(1), Constraint::Length(3)]).areas(f.area());

    if matches!(app.mode, Mode::Log { .. }) {
        detail::draw_log(app, theme, f, body);
    } else if body.width >= GRID_MIN_WIDTH && body.height >= GRID_MIN_HEIGHT - 3 {
        let [top, bottom] =
            Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(body);
        let [jobs_area, detail_area] =
            Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(top);
        let [agents_area, images_area] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(bottom);
        draw_pane(app, theme, f, Pane::Jobs, jobs_area);
        draw_pane(app, theme, f, Pane::Detail, detail_area);
        draw_pane(app, theme, f, Pane::Agents, agents_area);
        draw_pane(app, theme, f, Pane::Images, images_area);
    } else {
        let [tabs, pane] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(body);
        draw_tabs(app, theme, f, tabs);
        draw_pane(app, theme, f, app.focus, pane);
    }
    let grid = !matches!(app.mode, Mode::Log { .. })
        && body.width >= GRID_MIN_WIDTH
        && body.height >= GRID_MIN_HEIGHT - 3;
    draw_status_bar(app, theme, f, bar, grid);
    overlay::draw(app, theme, f, body);
}

fn draw_pane(app: &App, theme: Theme, f: &mut Frame, pane: Pane, area: Rect) {
    let focused = app.focus == pane;
    match pane {
        Pane::Jobs => jobs::draw(app, theme, f, area, focused),
        Pane::Agents => agents::draw(app, theme, f, area, focused),
        Pane::Images => images::draw(app, theme, f, area, focused),
        Pane::Detail => detail::draw(app, theme, f, area, focused),
    }
}

/// A pane's frame: its title, a count, and the filter when one applies.
/// Fills an empty pane with a dim line: "reading the spool…" until the first
/// read arrives, then `empty`, which says why there is nothing to show.
fn placeholder(app: &App, theme: Theme, f: &mut Frame, area: Rect, empty: &str) {
    let text = if app.loaded {
        empty
    } else {
        "reading the spool…"
    };
    f.render_widget(Paragraph::new(Span::styled(text, theme.dim())), area);
}

fn pane_block(
    app: &App,
    theme: Theme,
    title: &str,
    count: Option<usize>,
    focused: bool,
) -> Block<'static> {
    let mut text = format!(" {title}");
    if let Some(n) = count {
        text.push_str(&format!(" ({n})"));
    }
    if !app.filter.is_empty() && count.is_some() {
        text.push_str(&format!(" /{}", printable(&app.filter)));
    }
    text.push(' ');
    Block::new()
        .borders(Borders::ALL)
        .border_type(if focused {
            BorderType::Thick
        } else {
            BorderType::Plain
        })
        .border_style(theme.border(focused))
        .title(Span::styled(text, theme.header()))
}

fn draw_tabs(app: &App, theme: Theme, f: &mut Frame, area: Rect) {
    let mut spans = vec![Span::raw(" ")];
    for (i, p) in Pane::ALL.iter().enumerate() {
        if i > 0 {
            spans.push(Span::styled(" │ ", theme.dim()));
        }
        let style = if *p == app.focus {
            theme.selected().patch(theme.header())
        } else {
            Style::new()
        };
        spans.push(Span::styled(format!(" {} ", p.title()), style));
    }
    // The spool's path goes here when the status bar has no room for it.
    let used: usize = spans.iter().map(|s| s.width()).sum();
    let room = (area.width as usize).saturating_sub(used + 2);
    let path = shorten_left(&printable(&app.spool_label), room);
    let pad = room.saturating_sub(path.chars().count());
    spans.push(Span::raw(" ".repeat(pad + 1)));
    spans.push(Span::styled(path, theme.dim()));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_status_bar(app: &App, theme: Theme, f: &mut Frame, area: Rect, with_path: bool) {
    let [counts_line, note_line, keys_line] =
        Layout::vertical([Constraint::Length(1); 3]).areas(area);

    let mut counts: Vec<Span> = Vec::new();
    if app.loaded {
        for (state, n) in JobState::ALL.iter().zip(app.state.counts()) {
            counts.push(Span::styled(format!("{n} "), theme.header()));
            counts.push(Span::styled(format!("{state} "), theme.state(*state)));
            counts.push(Span::raw(if with_path { " " } else { "" }));
        }
    } else {
        counts.push(Span::styled("reading the spool…  ", theme.dim()));
    }
    let mut line = vec![Span::raw(" ")];
    if with_path {
        let used: usize = counts.iter().map(|s| s.width()).sum();
        let room = (area.width as usize).saturating_sub(used + 10);
        line.push(Span::styled("spool ", theme.dim()));
        line.push(Span::raw(shorten_left(&printable(&app.spool_label), room)));
        line.push(Span::styled(" │ ", theme.dim()));
    }
    line.extend(counts);
    f.render_widget(Paragraph::new(Line::from(line)), counts_line);

    let mut note = vec![Span::raw(" ")];
    if app.pending > 0 {
        // Changes wait their turn behind the masters' lock; say so, whatever
        // the last note was.
        note.push(Span::styled(
            format!("⧗ {} pending  ", app.pending),
            theme.dim(),
        ));
    }
    if app.mode == Mode::Filter {
        note.extend([
            Span::styled("filter /", theme.key()),
            Span::raw(printable(&app.filter).into_owned()),
            Span::styled("█", theme.dim()),
        ]);
    } else if let Some(n) = app.note.as_ref().or(app.reaper_note.as_ref()) {
        note.push(Span::styled(
            printable(&n.text).into_owned(),
            theme.note(n.error),
        ));
    }
    let note = Line::from(note);
    f.render_widget(Paragraph::new(note), note_line);

    let mut spans = vec![Span::raw(" ")];
    for (k, what) in key_hints(app) {
        spans.push(Span::styled(k, theme.key()));
        spans.push(Span::raw(format!(" {what}  ")));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), keys_line);
}

/// The keys that matter where the keyboard is now, most useful first.
fn key_hints(app: &App) -> Vec<(&'static str, &'static str)> {
    match &app.mode {
        Mode::Help => vec![("any key", "close")],
        Mode::Filter => vec![("Enter", "keep"), ("Esc", "clear"), ("Backspace", "delete")],
        Mode::AddJob { .. } => vec![("Enter", "add"), ("Esc", "back")],
        Mode::Confirm(_) => vec![("y", "yes"), ("n", "no")],
        Mode::Log { .. } => vec![
            ("↑↓", "scroll"),
            ("PgUp PgDn", "page"),
            ("g G", "top/end"),
            ("Esc", "back"),
        ],
        Mode::Normal => {
            let mut keys = match app.focus {
                Pane::Jobs | Pane::Detail => vec![
                    (
                        "↑↓",
                        if app.focus == Pane::Jobs {
                            "move"
                        } else {
                            "scroll"
                        },
                    ),
                    ("+-", "priority"),
                    ("KJ", "order"),
                    ("c", "cancel"),
                    ("r", "requeue"),
                    ("R", "reclaim"),
                    ("e", "extend"),
                    ("l", "log"),
                    ("a", "add"),
                ],
                Pane::Agents | Pane::Images => {
                    vec![("↑↓", "move"), ("Enter", "show job"), ("a", "add")]
                }
            };
            keys.extend([
                ("/", "filter"),
                ("Tab", "pane"),
                ("?", "help"),
                ("q", "quit"),
            ]);
            keys
        }
    }
}

/// Keeps the end of a path, which names the spool, when space is short.
fn shorten_left(text: &str, room: usize) -> String {
    let n = text.chars().count();
    if n <= room {
        return text.to_string();
    }
    let keep = room.saturating_sub(1);
    let tail: String = text.chars().skip(n - keep).collect();
    format!("…{tail}")
}

/// Seconds since `t`, compactly.
fn age(now: Timestamp, t: Timestamp) -> String {
    format_secs(t.secs_until(now).max(0))
}

/// A text gauge: `████░░░░ 50%`.
fn gauge(progress: f32, width: usize) -> String {
    let p = progress.clamp(0.0, 1.0);
    let filled = (p * width as f32).round() as usize;
    format!(
        "{}{} {:>3}%",
        "█".repeat(filled),
        "░".repeat(width - filled),
        (p * 100.0).round() as u32
    )
}

/// The rows `[offset, offset + height)` that keep `cursor` in view.
fn window(cursor: usize, height: usize) -> usize {
    if height == 0 || cursor < height {
        0
    } else {
        cursor + 1 - height
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_fills_in_proportion() {
        assert_eq!(gauge(0.5, 4), "██░░  50%");
        assert_eq!(gauge(1.0, 2), "██ 100%");
        assert_eq!(gauge(-1.0, 2), "░░   0%");
    }

    #[test]
    fn long_paths_keep_their_end() {
        assert_eq!(shorten_left("/srv/kiln/spool", 8), "…n/spool");
        assert_eq!(shorten_left("/srv", 8), "/srv");
    }

    #[test]
    fn window_keeps_the_cursor_visible() {
        assert_eq!(window(3, 10), 0);
        assert_eq!(window(12, 10), 3);
    }
}
