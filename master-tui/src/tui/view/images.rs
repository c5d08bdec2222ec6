//! The Images pane: published images, newest first; when focused and
//! tall enough, the selected image's provenance below them.

use kiln_spool::master::provenance::SignatureCheck;
use kiln_spool::printable::printable;
use kiln_spool::units::human_bytes;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, HighlightSpacing, Paragraph, Row, Table, TableState};
use ratatui::Frame;

use super::theme::Theme;
use super::{age, pane_block, placeholder, window};
use crate::provenance::{hardware_lines, phase_line};
use crate::tui::app::App;
use crate::tui::spool_state::ImageRow;

pub fn draw(app: &App, theme: Theme, f: &mut Frame, area: Rect, focused: bool) {
    let block = pane_block(app, theme, "Images", Some(app.image_rows.len()), focused);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.image_rows.is_empty() {
        placeholder(app, theme, f, inner, "no image published yet");
        return;
    }
    let inner = match app.selected_image() {
        Some(row) if focused && inner.height >= MIN_HEIGHT_FOR_PROVENANCE => {
            let table_height = (app.image_rows.len() as u16 + 1).clamp(2, inner.height / 3);
            let [table, below] =
                Layout::vertical([Constraint::Length(table_height), Constraint::Min(0)])
                    .areas(inner);
            draw_provenance(theme, f, below, row);
            table
        }
        _ => inner,
    };
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

/// Below this inner height the pane lists images only.
const MIN_HEIGHT_FOR_PROVENANCE: u16 = 10;

/// The selected image's provenance: signer and signature, agent, the build
/// machine in one-liners, and the phases. Agent-written text is escaped.
fn draw_provenance(theme: Theme, f: &mut Frame, area: Rect, row: &ImageRow) {
    let block = Block::new()
        .borders(Borders::TOP)
        .border_style(theme.dim())
        .title(Span::styled(
            format!(" provenance of {} ", printable(&row.job)),
            theme.header(),
        ));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let label = |s: &str| Span::styled(format!(" {s:<9}"), theme.dim());
    let mut lines = Vec::new();
    let p = row.provenance.clone().unwrap_or_default();
    let (mark, style) = match &row.signature {
        SignatureCheck::Valid(_) => ("✓ verifies", theme.good()),
        SignatureCheck::Missing => ("✗ unsigned", theme.danger()),
        SignatureCheck::Invalid(_) => ("✗ does not verify", theme.danger()),
        SignatureCheck::Unchecked(_) => ("? not checked", theme.dim()),
    };
    let signer = if p.signer.is_empty() {
        "none recorded".to_string()
    } else {
        printable(&p.signer).into_owned()
    };
    // The verdict first: a narrow pane cuts the fingerprint, not the verdict.
    lines.push(Line::from(vec![
        label("signer"),
        Span::styled(mark, style),
        Span::raw(format!(" {signer}")),
    ]));
    let version = if p.kiln_version.is_empty() {
        String::new()
    } else {
        format!(", kiln {}", printable(&p.kiln_version))
    };
    lines.push(Line::from(vec![
        label("agent"),
        Span::raw(format!("{}{version}", printable(&row.agent))),
    ]));
    for (name, value) in hardware_lines(&p.hardware) {
        lines.push(Line::from(vec![label(name), Span::raw(value)]));
    }
    if row.phases.is_empty() {
        lines.push(Line::from(vec![
            label("phases"),
            Span::raw("none reported"),
        ]));
    }
    for (i, ph) in row.phases.iter().enumerate() {
        lines.push(Line::from(vec![
            label(if i == 0 { "phases" } else { "" }),
            Span::raw(phase_line(ph)),
        ]));
    }
    f.render_widget(Paragraph::new(lines), inner);
}
