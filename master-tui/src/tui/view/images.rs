//! The Images pane: published images, newest first.

use kiln_spool::printable::printable;
use kiln_spool::units::human_bytes;
use ratatui::layout::{Constraint, Rect};
use ratatui::widgets::{Cell, HighlightSpacing, Row, Table, TableState};
use ratatui::Frame;

use super::theme::Theme;
use super::{age, pane_block, placeholder, window};
use crate::tui::app::App;

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect, focused: bool) {
    let block = pane_block(app, theme, "Images", Some(app.image_rows.len()), focused);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.image_rows.is_empty() {
        placeholder(app, theme, f, inner, "no image published yet");
        return;
    }
    // The hash gets what room is left; a prefix is enough to tell images apart.
    let wide = inner.width >= 100;
    let widths = [
        Constraint::Min(10),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(if wide { 20 } else { 11 }),
        Constraint::Length(if wide { 20 } else { 7 }),
        Constraint::Fill(1),
    ];
    let header = Row::new([
        "JOB",
        "SIZE",
        "RATIO",
        if wide { "BLAKE3 (verified)" } else { "BLAKE3" },
        if wide { "PUBLISHED" } else { "AGE" },
        "AGENT",
    ])
    .style(theme.header());
    let height = inner.height.saturating_sub(1) as usize;
    let offset = window(app.image_cursor, height);
    let hash_len = if wide { 16 } else { 8 };
    let rows = app
        .image_rows
        .iter()
        .skip(offset)
        .take(height)
        .map(|&i| {
            let m = &app.state.images[i];
            let hash: String = printable(&m.image_blake3).chars().take(hash_len).collect();
            Row::new([
                Cell::from(printable(&m.job).into_owned()),
                Cell::from(format!("{:>10}", human_bytes(m.image_size))),
                Cell::from(match m.ratio() {
                    Some(r) => format!("{r:>5.1}x"),
                    None => "    -".into(),
                }),
                Cell::from(format!("✓ {hash}…")).style(theme.good()),
                Cell::from(if wide {
                    m.published.to_string()
                } else {
                    age(app.now, m.published)
                }),
                Cell::from(printable(&m.agent).into_owned()),
            ])
        })
        .collect::<Vec<_>>();
    let mut state = TableState::new();
    if focused {
        state.select(Some(app.image_cursor - offset));
    }
    let table = Table::new(rows, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(theme.selected())
        .highlight_symbol("▶")
        .highlight_spacing(HighlightSpacing::Always);
    f.render_stateful_widget(table, inner, &mut state);
}
