//! Pop-ups over the panes: help, the add-job prompt, and confirmations.

use kiln_spool::printable::printable;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Padding, Paragraph, Wrap};
use ratatui::Frame;

use super::theme::Theme;
use crate::tui::app::{App, Confirm, Mode};
use crate::tui::spool_write::{EXTEND_BY, PRIORITY_STEP};

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect) {
    match &app.mode {
        Mode::Help => help(theme, f, area),
        Mode::AddJob {
            input,
            error,
            adding,
        } => add_job(theme, f, area, input, error.as_deref(), *adding),
        Mode::Confirm(what) => confirm(app, theme, f, area, what),
        _ => {}
    }
}

/// A rectangle of at most `w` by `h` in the middle of `area`.
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn popup(theme: Theme, title: &str) -> Block<'static> {
    Block::new()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .border_style(theme.border(true))
        .title(Span::styled(format!(" {title} "), theme.header()))
        .padding(Padding::horizontal(1))
}

fn help(theme: Theme, f: &mut Frame, area: Rect) {
    let step = PRIORITY_STEP.to_string();
    let extend = kiln_spool::time::format_secs(EXTEND_BY.as_secs() as i64);
    let keys: Vec<(&str, String)> = vec![
        ("Tab / S-Tab", "next / previous pane".into()),
        ("↑↓ j k", "move; PgUp PgDn g G jump".into()),
        ("a", "add a job from a file".into()),
        ("+ / -", format!("raise / lower the priority by {step}")),
        ("K / J", "move up / down in the queue".into()),
        ("c", "cancel the job (asks first)".into()),
        ("r", "requeue a failed, invalid or cancelled job".into()),
        ("R", "reclaim the lease now (asks first)".into()),
        ("e", format!("extend the lease by {extend}")),
        ("l / Enter", "open the job's log".into()),
        ("Enter", "in Agents and Images: show the job".into()),
        ("/", "filter every list; Esc clears".into()),
        ("q / Ctrl-C", "quit".into()),
    ];
    let mut lines: Vec<Line> = keys
        .into_iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<12}"), theme.key()),
                Span::raw(what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        " The reaper runs in the background while this is open.",
        theme.dim(),
    )));
    let rect = centered(area, 66, lines.len() as u16 + 2);
    f.render_widget(Clear, rect);
    f.render_widget(Paragraph::new(lines).block(popup(theme, "Keys")), rect);
}

fn add_job(
    theme: Theme,
    f: &mut Frame,
    area: Rect,
    input: &str,
    error: Option<&str>,
    adding: bool,
) {
    let error = error.map(printable);
    let mut lines = vec![
        Line::from(Span::styled("Path of the job file:", theme.header())),
        Line::from(vec![
            Span::raw(format!("> {}", printable(input))),
            Span::styled("█", theme.dim()),
        ]),
        Line::from(""),
    ];
    match &error {
        Some(e) => lines.push(Line::from(Span::styled(e.to_string(), theme.danger()))),
        None if adding => lines.push(Line::from(Span::styled(
            "adding it (the reaper may hold the masters' lock)…",
            theme.dim(),
        ))),
        None => lines.push(Line::from(Span::styled(
            "Enter adds it; Esc goes back.",
            theme.dim(),
        ))),
    }
    let width = area.width.saturating_sub(4).min(76);
    let text_width = width.saturating_sub(4).max(1) as usize;
    let error_rows = error
        .as_ref()
        .map_or(1, |e| e.chars().count().div_ceil(text_width).max(1));
    let rect = centered(area, width, 5 + error_rows as u16);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(popup(theme, "Add a job")),
        rect,
    );
}

fn confirm(app: &App, theme: Theme, f: &mut Frame, area: Rect, what: &Confirm) {
    let (title, question, consequence) = match what {
        Confirm::Cancel(id) => (
            "Cancel",
            format!("Cancel job {}?", printable(id)),
            "Its lease is removed; an agent building it stops.".to_string(),
        ),
        Confirm::Reclaim(id) => {
            let holder = app
                .state
                .jobs
                .iter()
                .find(|j| &j.id == id)
                .and_then(|j| j.holder.as_deref())
                .map_or("its agent".into(), printable);
            (
                "Reclaim",
                format!("Reclaim the lease on {} now?", printable(id)),
                format!("{holder} loses it and the attempt counts."),
            )
        }
    };
    let lines = vec![
        Line::from(Span::styled(question, theme.header())),
        Line::from(consequence),
        Line::from(""),
        Line::from(vec![
            Span::styled("y", theme.key()),
            Span::raw(" yes   "),
            Span::styled("n", theme.key()),
            Span::raw(" no"),
        ]),
    ];
    let rect = centered(area, area.width.saturating_sub(4).min(62), 6);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .style(Style::new())
            .block(popup(theme, title)),
        rect,
    );
}
