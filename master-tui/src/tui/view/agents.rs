//! The Agents pane: every agent seen in status records and history.

use kiln_spool::printable::printable;
use ratatui::layout::{Constraint, Rect};
use ratatui::widgets::{Cell, HighlightSpacing, Row, Table, TableState};
use ratatui::Frame;

use super::theme::Theme;
use super::{age, pane_block, placeholder, window};
use crate::tui::app::App;

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect, focused: bool) {
    let block = pane_block(app, theme, "Agents", Some(app.agent_rows.len()), focused);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.agent_rows.is_empty() {
        placeholder(app, theme, f, inner, "no agent has reported yet");
        return;
    }
    let widths = [
        Constraint::Min(10),
        Constraint::Fill(1),
        Constraint::Min(8),
        Constraint::Length(9),
        Constraint::Length(13),
        Constraint::Length(4),
    ];
    let header =
        Row::new(["AGENT", "SERVER", "JOB", "PHASE", "HEARTBEAT", "DONE"]).style(theme.header());
    let height = inner.height.saturating_sub(1) as usize;
    let offset = window(app.agent_cursor, height);
    let rows = app
        .agent_rows
        .iter()
        .skip(offset)
        .take(height)
        .map(|&i| {
            let a = &app.state.agents[i];
            let heartbeat = match a.last_heartbeat {
                Some(t) if a.is_stale(app.now) => {
                    Cell::from(format!("{} STALE", age(app.now, t))).style(theme.danger())
                }
                Some(t) => Cell::from(format!("{} ago", age(app.now, t))),
                None if a.is_stale(app.now) => Cell::from("never STALE").style(theme.danger()),
                None => Cell::from("never"),
            };
            Row::new([
                Cell::from(printable(&a.id).into_owned()),
                Cell::from(printable(&a.server).into_owned()),
                Cell::from(printable(a.job.as_deref().unwrap_or("")).into_owned()),
                Cell::from(a.phase.map_or("", |p| p.as_str())),
                heartbeat,
                Cell::from(format!("{:>4}", a.done)),
            ])
        })
        .collect::<Vec<_>>();
    let mut state = TableState::new();
    if focused {
        state.select(Some(app.agent_cursor - offset));
    }
    let table = Table::new(rows, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(theme.selected())
        .highlight_symbol("▶")
        .highlight_spacing(HighlightSpacing::Always);
    f.render_stateful_widget(table, inner, &mut state);
}
