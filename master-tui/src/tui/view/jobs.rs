//! The Jobs pane: active jobs in the order agents take them, then a section
//! of finished ones.

use kiln_spool::master::JobView;
use kiln_spool::printable::printable;
use kiln_spool::time::{format_secs, Timestamp};
use ratatui::layout::{Constraint, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, HighlightSpacing, Paragraph, Row, Table, TableState};
use ratatui::Frame;

use super::theme::Theme;
use super::{age, gauge, pane_block, placeholder, window};
use crate::tui::app::App;

/// A lease with less than this left, or less than a tenth of its time, is close.
const CLOSE_SECS: i64 = 60;

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect, focused: bool) {
    let block = pane_block(app, theme, "Jobs", Some(app.job_rows.len()), focused);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.job_rows.is_empty() {
        let empty = if app.filter.is_empty() {
            "no jobs yet: press a to add one, or run `kiln-master add FILE`"
        } else {
            "no job matches the filter (Esc clears it)"
        };
        placeholder(app, theme, f, inner, empty);
        return;
    }

    let wide = inner.width >= 100;
    let bar = if wide { 10 } else { 5 };
    let widths = [
        Constraint::Min(10),
        Constraint::Length(4),
        Constraint::Length(9),
        Constraint::Length(if wide { 14 } else { 10 }),
        Constraint::Length(if wide { 10 } else { 9 }),
        Constraint::Length(bar as u16 + 5),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(6),
    ];
    let header = Row::new([
        "ID", "PRI", "STATE", "HOLDER", "PHASE", "PROGRESS", "LEFT", "ATT", "AGE",
    ])
    .style(theme.header());

    // Display rows: the jobs, with a separator line before the finished ones.
    let rows = &app.job_rows;
    let has_sep = app.finished_start < rows.len();
    let total = rows.len() + usize::from(has_sep);
    let display = |cursor: usize| cursor + usize::from(has_sep && cursor >= app.finished_start);
    let height = inner.height.saturating_sub(1) as usize;
    let offset = window(display(app.job_cursor), height);
    let end = (offset + height).min(total);

    let mut table_rows = Vec::with_capacity(end - offset);
    let mut sep_at = None;
    for d in offset..end {
        if has_sep && d == app.finished_start {
            sep_at = Some(d - offset);
            table_rows.push(Row::new([""]));
            continue;
        }
        let i = if has_sep && d > app.finished_start {
            d - 1
        } else {
            d
        };
        table_rows.push(job_row(&app.state.jobs[rows[i]], app.now, theme, bar));
    }
    let mut state = TableState::new().with_offset(0);
    if focused || app.focus == crate::tui::app::Pane::Detail {
        state.select(Some(display(app.job_cursor) - offset));
    }
    let table = Table::new(table_rows, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(theme.selected())
        .highlight_symbol("▶")
        .highlight_spacing(HighlightSpacing::Always);
    f.render_stateful_widget(table, inner, &mut state);

    if let Some(y) = sep_at {
        let finished = rows.len() - app.finished_start;
        let label = format!("── finished ({finished}) ");
        let fill = (inner.width as usize).saturating_sub(label.chars().count());
        let line = Line::from(Span::styled(
            format!("{label}{}", "─".repeat(fill)),
            theme.dim(),
        ));
        let area = Rect {
            y: inner.y + 1 + y as u16,
            height: 1,
            ..inner
        };
        f.render_widget(Paragraph::new(line), area);
    }
}

fn job_row(j: &JobView, now: Timestamp, theme: Theme, bar: usize) -> Row<'static> {
    let progress = match j.progress {
        Some(p) if j.state.is_active() => Cell::from(gauge(p, bar)).style(theme.state(j.state)),
        _ => Cell::from(""),
    };
    let left = match &j.lease {
        Some(l) => {
            let remaining = now.secs_until(l.deadline);
            let total = l.acquired.secs_until(l.deadline);
            let close = remaining <= CLOSE_SECS.max(total / 10);
            Cell::from(format_secs(remaining)).style(if close {
                theme.danger()
            } else {
                Style::new()
            })
        }
        None => Cell::from(""),
    };
    Row::new([
        Cell::from(printable(&j.id).into_owned()),
        Cell::from(format!("{:>4}", j.priority)),
        Cell::from(j.state.as_str()).style(theme.state(j.state)),
        Cell::from(printable(j.holder.as_deref().unwrap_or("")).into_owned()),
        Cell::from(j.phase.map_or("", |p| p.as_str())),
        progress,
        left,
        Cell::from(if j.max_attempts > 0 {
            format!("{}/{}", j.attempts, j.max_attempts)
        } else {
            j.attempts.to_string()
        }),
        Cell::from(age(now, j.submitted)),
    ])
}
