//! `update`: the only code that changes the console's state. It never touches
//! the spool: reads and changes go out as [`Effect`]s to the workers, and
//! their results come back as [`Msg`]s.

use std::path::{Path, PathBuf};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{App, Confirm, Mode, Note, Pane};
use super::msg::{Effect, Msg};
use super::spool_write::Change;

/// Rows PgUp and PgDn move.
const PAGE: usize = 10;

/// Applies one message to the state and says what to read next.
pub fn update(app: &mut App, msg: Msg) -> Vec<Effect> {
    match msg {
        Msg::Tick(now) => {
            app.now = now;
            vec![]
        }
        Msg::Resize => vec![],
        Msg::Terminate => {
            tracing::info!("stopping on a signal");
            app.quit = true;
            vec![]
        }
        Msg::Spool(state) => {
            app.state = *state;
            app.loaded = true;
            app.refilter();
            // The log may have grown and the spec been requeued: read it again.
            detail_effect(app, true)
        }
        Msg::SpoolError(e) => {
            app.set_note(e, true);
            vec![]
        }
        Msg::Detail(d) => {
            app.detail = Some(*d);
            vec![]
        }
        Msg::Reaped(Ok(report)) => {
            if !report.is_empty() {
                let text = format!("reaper: {}", report.lines().join("; "));
                tracing::info!("{text}");
                app.reaper_note = Some(Note { text, error: false });
                return vec![Effect::Refresh];
            }
            vec![]
        }
        Msg::Reaped(Err(e)) => {
            tracing::warn!("reaper: {e}");
            app.reaper_note = Some(Note {
                text: format!("reaper: {e}"),
                error: true,
            });
            vec![]
        }
        Msg::Changed(result) => {
            app.pending = app.pending.saturating_sub(1);
            match result {
                Ok(text) => {
                    tracing::info!("{text}");
                    app.set_note(text, false);
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    app.set_note(e, true);
                }
            }
            vec![Effect::Refresh]
        }
        Msg::Added { input, result } => {
            app.pending = app.pending.saturating_sub(1);
            added(app, &input, result)
        }
        Msg::Key(key) => on_key(app, key),
        Msg::Paste(text) => {
            // One line only: a pasted newline must not submit anything.
            let text = text.lines().next().unwrap_or("").to_string();
            match &mut app.mode {
                Mode::AddJob { input, .. } => input.push_str(&text),
                Mode::Filter => {
                    app.filter.push_str(&text);
                    app.refilter();
                }
                _ => {}
            }
            vec![]
        }
    }
}

fn detail_effect(app: &App, always: bool) -> Vec<Effect> {
    match app.selected() {
        Some(j) if always || app.current_detail().is_none() => {
            vec![Effect::LoadDetail(j.id.clone())]
        }
        _ => vec![],
    }
}

fn on_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        app.quit = true;
        return vec![];
    }
    match app.mode.clone() {
        Mode::Normal => normal_key(app, key),
        Mode::Help => {
            app.mode = Mode::Normal;
            vec![]
        }
        Mode::Filter => {
            match key.code {
                KeyCode::Enter => app.mode = Mode::Normal,
                KeyCode::Esc => {
                    app.filter.clear();
                    app.mode = Mode::Normal;
                }
                KeyCode::Backspace => {
                    app.filter.pop();
                }
                KeyCode::Char(c) => app.filter.push(c),
                _ => return vec![],
            }
            app.refilter();
            detail_effect(app, false)
        }
        Mode::AddJob {
            mut input,
            error,
            adding,
        } => match key.code {
            KeyCode::Esc => {
                app.mode = Mode::Normal;
                vec![]
            }
            KeyCode::Enter if !adding => add_job(app, &input),
            KeyCode::Backspace => {
                input.pop();
                app.mode = Mode::AddJob {
                    input,
                    error,
                    adding,
                };
                vec![]
            }
            KeyCode::Char(c) => {
                input.push(c);
                app.mode = Mode::AddJob {
                    input,
                    error,
                    adding,
                };
                vec![]
            }
            _ => vec![],
        },
        Mode::Confirm(what) => match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => {
                app.mode = Mode::Normal;
                match what {
                    Confirm::Cancel(id) => queue(app, Change::Cancel(id)),
                    Confirm::Reclaim(id) => queue(app, Change::Reclaim(id)),
                }
            }
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => {
                app.mode = Mode::Normal;
                app.set_note("nothing changed", false);
                vec![]
            }
            _ => vec![],
        },
        Mode::Log { up } => {
            let len = app.current_detail().map_or(0, |d| d.log.len());
            let up = match key.code {
                KeyCode::Esc | KeyCode::Char('q') | KeyCode::Char('l') | KeyCode::Enter => {
                    app.mode = Mode::Normal;
                    return vec![];
                }
                KeyCode::Up | KeyCode::Char('k') => up + 1,
                KeyCode::Down | KeyCode::Char('j') => up.saturating_sub(1),
                KeyCode::PageUp => up + PAGE,
                KeyCode::PageDown => up.saturating_sub(PAGE),
                KeyCode::Home | KeyCode::Char('g') => len,
                KeyCode::End | KeyCode::Char('G') => 0,
                _ => up,
            };
            app.mode = Mode::Log {
                up: up.min(len.saturating_sub(1)),
            };
            vec![]
        }
    }
}

fn normal_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Char('q') => {
            app.quit = true;
            return vec![];
        }
        KeyCode::Char('?') => app.mode = Mode::Help,
        KeyCode::Tab => app.focus = app.focus.next(false),
        KeyCode::BackTab => app.focus = app.focus.next(true),
        KeyCode::Char('/') => app.mode = Mode::Filter,
        KeyCode::Esc => {
            app.note = None;
            if !app.filter.is_empty() {
                app.filter.clear();
                app.refilter();
                return detail_effect(app, false);
            }
        }
        KeyCode::Char('a') => {
            app.note = None;
            app.mode = Mode::AddJob {
                input: String::new(),
                error: None,
                adding: false,
            }
        }
        KeyCode::Up | KeyCode::Char('k') => return move_cursor(app, -1),
        KeyCode::Down | KeyCode::Char('j') => return move_cursor(app, 1),
        KeyCode::PageUp => return move_cursor(app, -(PAGE as i64)),
        KeyCode::PageDown => return move_cursor(app, PAGE as i64),
        KeyCode::Home | KeyCode::Char('g') => return move_cursor(app, i64::MIN / 2),
        KeyCode::End | KeyCode::Char('G') => return move_cursor(app, i64::MAX / 2),
        KeyCode::Enter if matches!(app.focus, Pane::Agents | Pane::Images) => {
            let job = match app.focus {
                Pane::Agents => app.selected_agent().and_then(|a| a.job.clone()),
                _ => app.selected_image().map(|m| m.job.clone()),
            };
            if let Some(id) = job {
                if app.select_job(&id) {
                    app.focus = Pane::Detail;
                    return detail_effect(app, false);
                }
            }
        }
        _ if matches!(app.focus, Pane::Jobs | Pane::Detail) => return job_key(app, key),
        _ => {}
    }
    vec![]
}

/// Keys that act on the selected job.
fn job_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    let Some(id) = app.selected().map(|j| j.id.clone()) else {
        return vec![];
    };
    match key.code {
        KeyCode::Char('+') | KeyCode::Char('=') => queue(app, Change::Priority { id, up: true }),
        KeyCode::Char('-') => queue(app, Change::Priority { id, up: false }),
        KeyCode::Char('K') => queue(app, Change::Shift { id, up: true }),
        KeyCode::Char('J') => queue(app, Change::Shift { id, up: false }),
        KeyCode::Char('c') => {
            app.mode = Mode::Confirm(Confirm::Cancel(id));
            vec![]
        }
        KeyCode::Char('R') => {
            app.mode = Mode::Confirm(Confirm::Reclaim(id));
            vec![]
        }
        KeyCode::Char('r') => queue(app, Change::Requeue(id)),
        KeyCode::Char('e') => queue(app, Change::Extend(id)),
        KeyCode::Char('l') | KeyCode::Enter => {
            app.note = None;
            app.mode = Mode::Log { up: 0 };
            detail_effect(app, false)
        }
        _ => vec![],
    }
}

fn move_cursor(app: &mut App, by: i64) -> Vec<Effect> {
    fn step(cursor: usize, len: usize, by: i64) -> usize {
        (cursor as i64 + by).clamp(0, len.saturating_sub(1) as i64) as usize
    }
    match app.focus {
        Pane::Jobs => {
            app.job_cursor = step(app.job_cursor, app.job_rows.len(), by);
            app.selected_job = app.selected().map(|j| j.id.clone());
            app.detail_scroll = 0;
            return detail_effect(app, false);
        }
        Pane::Agents => app.agent_cursor = step(app.agent_cursor, app.agent_rows.len(), by),
        Pane::Images => app.image_cursor = step(app.image_cursor, app.image_rows.len(), by),
        Pane::Detail => {
            app.detail_scroll = (app.detail_scroll as i64 + by).clamp(0, u16::MAX as i64) as u16
        }
    }
    vec![]
}

/// Hands a change to the spool writer; its outcome comes back as
/// [`Msg::Changed`] or [`Msg::Added`]. Until then the status line says what
/// is under way: the writer may be waiting for the masters' lock.
fn queue(app: &mut App, change: Change) -> Vec<Effect> {
    let doing = change.doing();
    tracing::info!("{doing}");
    app.set_note(format!("{doing}…"), false);
    app.pending += 1;
    vec![Effect::Change(change)]
}

/// Expands a leading `~/` as a shell would.
fn expand_path(input: &str) -> PathBuf {
    match (input.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(input),
    }
}

fn add_job(app: &mut App, input: &str) -> Vec<Effect> {
    let input = input.trim();
    if input.is_empty() {
        app.mode = Mode::AddJob {
            input: String::new(),
            error: Some("type the path of a job file".into()),
            adding: false,
        };
        return vec![];
    }
    app.mode = Mode::AddJob {
        input: input.to_string(),
        error: None,
        adding: true,
    };
    let path = expand_path(input);
    queue(
        app,
        Change::Add {
            input: input.to_string(),
            path,
        },
    )
}

/// The outcome of adding a job: the prompt closes on the new job, or stays
/// open with the error under what was typed.
fn added(app: &mut App, input: &str, result: Result<(String, u32), String>) -> Vec<Effect> {
    match result {
        Ok((id, priority)) => {
            let text = format!("added {id} at priority {priority}");
            tracing::info!("{text} from {input}");
            app.set_note(text, false);
            if matches!(app.mode, Mode::AddJob { .. }) {
                app.mode = Mode::Normal;
                app.focus = Pane::Jobs;
                // The refresh puts the cursor on it.
                app.selected_job = Some(id);
            }
            vec![Effect::Refresh]
        }
        Err(e) => {
            tracing::info!("adding {input}: {e}");
            match &mut app.mode {
                Mode::AddJob { error, adding, .. } => {
                    app.note = None;
                    *error = Some(e);
                    *adding = false;
                }
                _ => app.set_note(format!("adding {input}: {e}"), true),
            }
            vec![]
        }
    }
}
