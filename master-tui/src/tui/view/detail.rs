//! The Detail pane for the selected job (spec summary, status, log tail) and
//! the full-screen log view.

use kiln_spool::master::JobView;
use kiln_spool::printable::printable;
use kiln_spool::time::format_secs;
use kiln_spool::JobSpec;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

use super::theme::Theme;
use super::{age, gauge, pane_block, placeholder};
use crate::tui::app::{App, Mode};
use crate::tui::spool_state::Detail;

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect, focused: bool) {
    let title = match app.selected() {
        Some(j) => format!("Detail: {}", printable(&j.id)),
        None => "Detail".to_string(),
    };
    let block = pane_block(app, theme, &title, None, focused);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(job) = app.selected() else {
        placeholder(app, theme, f, inner, "no job selected");
        return;
    };
    let mut lines = status_lines(app, theme, job);
    let detail = app.current_detail();
    match detail.map(|d| &d.spec) {
        Some(Ok(spec)) => spec_lines(theme, spec, &mut lines),
        Some(Err(e)) => lines.push(Line::from(Span::styled(
            format!("spec: {}", printable(e)),
            theme.danger(),
        ))),
        None => lines.push(Line::from(Span::styled("reading the job…", theme.dim()))),
    }
    if let Some(d) = detail {
        log_tail(theme, d, inner.height as usize, &mut lines);
    }
    f.render_widget(Paragraph::new(lines).scroll((app.detail_scroll, 0)), inner);
}

fn label(text: &str, theme: Theme) -> Span<'static> {
    Span::styled(format!("{text:<9}"), theme.header())
}

fn status_lines(app: &App, theme: Theme, j: &JobView) -> Vec<Line<'static>> {
    let mut lines = vec![Line::from(vec![
        label("state", theme),
        Span::styled(j.state.as_str().to_string(), theme.state(j.state)),
        Span::raw(format!(
            "  priority {}  attempts {}/{}  submitted {} ago",
            j.priority,
            j.attempts,
            j.max_attempts,
            age(app.now, j.submitted)
        )),
    ])];
    if let Some(l) = &j.lease {
        let left = app.now.secs_until(l.deadline);
        lines.push(Line::from(vec![
            label("lease", theme),
            Span::raw(format!("{} (attempt {}), ", printable(&l.agent), l.attempt)),
            Span::styled(
                if left >= 0 {
                    format!("{} left", format_secs(left))
                } else {
                    format!("expired {} ago", format_secs(-left))
                },
                if left <= 60 {
                    theme.danger()
                } else {
                    Style::new()
                },
            ),
            Span::styled(format!(", until {}", l.deadline), theme.dim()),
        ]));
    } else if let Some(h) = &j.holder {
        lines.push(Line::from(vec![
            label("built by", theme),
            Span::raw(printable(h).into_owned()),
        ]));
    }
    if let Some(s) = &j.status {
        let mut spans = vec![
            label("phase", theme),
            Span::raw(format!("{} {}", s.phase, gauge(s.progress, 10))),
            Span::styled(
                format!(
                    "  heartbeat {} ago, since {} ago",
                    age(app.now, s.updated),
                    age(app.now, s.started)
                ),
                theme.dim(),
            ),
        ];
        if !s.server.is_empty() {
            spans.push(Span::styled(
                format!(" via {}", printable(&s.server)),
                theme.dim(),
            ));
        }
        lines.push(Line::from(spans));
        if s.bytes_total > 0 {
            lines.push(Line::from(vec![label("bytes", theme), Span::raw(bytes(s))]));
        }
    }
    if !j.message.is_empty() {
        let style = if matches!(
            j.state,
            kiln_spool::master::JobState::Failed | kiln_spool::master::JobState::Invalid
        ) {
            theme.danger()
        } else {
            Style::new()
        };
        lines.push(Line::from(vec![
            label("message", theme),
            Span::styled(printable(&j.message).into_owned(), style),
        ]));
    }
    lines
}

fn spec_lines(theme: Theme, spec: &JobSpec, lines: &mut Vec<Line<'static>>) {
    if !spec.description.is_empty() {
        lines.push(Line::from(vec![
            label("about", theme),
            Span::raw(printable(&spec.description).into_owned()),
        ]));
    }
    lines.push(Line::from(vec![
        label("limits", theme),
        Span::raw(format!(
            "{} per attempt, {} attempts, image {} level {}",
            format_secs(spec.time_limit.as_secs() as i64),
            spec.max_attempts,
            spec.image.format,
            spec.image.compression_level
        )),
    ]));
    let table = format!("{:?}", spec.disk.table).to_lowercase();
    lines.push(Line::from(vec![
        label("disk", theme),
        Span::raw(format!("{} ({table})", printable(&spec.disk.device))),
    ]));
    for p in &spec.disk.partitions {
        lines.push(Line::from(format!(
            "  {:<10} {:>7} {:<9} {:<5} {}",
            printable(&p.label),
            p.size.to_string(),
            format!("{:?}", p.kind).to_lowercase(),
            format!("{:?}", p.fs).to_lowercase(),
            printable(p.mount.as_deref().unwrap_or(""))
        )));
    }
    if !spec.payloads.is_empty() {
        lines.push(Line::from(label("payloads", theme)));
        for p in &spec.payloads {
            let hash: String = printable(p.blake3.as_deref().unwrap_or(""))
                .chars()
                .take(12)
                .collect();
            lines.push(Line::from(vec![
                Span::raw(format!(
                    "  {} -> {}",
                    printable(&p.name),
                    printable(&p.dest)
                )),
                Span::styled(format!("  {hash}…"), theme.dim()),
            ]));
        }
    }
    if !spec.steps.is_empty() {
        lines.push(Line::from(label("steps", theme)));
        for (i, s) in spec.steps.iter().enumerate() {
            lines.push(Line::from(format!(
                "  {}. {} ({}, {})",
                i + 1,
                printable(&s.name),
                format!("{:?}", s.place).to_lowercase(),
                format_secs(s.time_limit.as_secs() as i64)
            )));
        }
    }
}

/// The end of the log, as much as fits under what is already there.
fn log_tail(theme: Theme, d: &Detail, height: usize, lines: &mut Vec<Line<'static>>) {
    let Some(source) = &d.log_source else {
        lines.push(Line::from(vec![
            label("log", theme),
            Span::styled("none yet", theme.dim()),
        ]));
        return;
    };
    lines.push(Line::from(vec![
        label("log", theme),
        Span::styled(format!("{} (l opens it)", printable(source)), theme.dim()),
    ]));
    let room = height.saturating_sub(lines.len()).max(3);
    let skip = d.log.len().saturating_sub(room);
    lines.extend(d.log[skip..].iter().map(|l| Line::from(format!("  {l}"))));
}

pub fn draw_log(app: &App, theme: Theme, f: &mut Frame, area: Rect) {
    let up = match app.mode {
        Mode::Log { up } => up,
        _ => 0,
    };
    let detail = app.current_detail();
    let title = match detail.and_then(|d| d.log_source.as_ref()) {
        Some(src) => format!("Log: {}", printable(src)),
        None => match app.selected() {
            Some(j) => format!("Log: {}", printable(&j.id)),
            None => "Log".into(),
        },
    };
    let block = pane_block(app, theme, &title, None, true);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(d) = detail else {
        f.render_widget(
            Paragraph::new(Span::styled("reading the log…", theme.dim())),
            inner,
        );
        return;
    };
    if d.log.is_empty() {
        f.render_widget(
            Paragraph::new(Span::styled(
                "this job has no log yet: agents upload it with the image, and it appears in logs/ while they run",
                theme.dim(),
            ))
            .wrap(Wrap { trim: true }),
            inner,
        );
        return;
    }
    let end = d.log.len().saturating_sub(up);
    let start = end.saturating_sub(inner.height as usize);
    let lines: Vec<Line> = d.log[start..end]
        .iter()
        .map(|l| Line::from(l.as_str()))
        .collect();
    f.render_widget(Paragraph::new(lines), inner);
}

/// `412.0 MiB / 731.0 MiB` of the phase.
fn bytes(s: &kiln_spool::status::Status) -> String {
    format!(
        "{} / {}",
        kiln_spool::units::human_bytes(s.bytes_done),
        kiln_spool::units::human_bytes(s.bytes_total)
    )
}
