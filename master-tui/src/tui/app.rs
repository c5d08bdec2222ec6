//! The console's whole state. Only `update` changes it; `view` reads it.

use std::path::PathBuf;

use kiln_spool::master::JobView;
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

use super::spool_state::{AgentRow, Detail, ImageRow, SpoolState};

/// The panes Tab moves between, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Jobs,
    Agents,
    Images,
    Detail,
}

impl Pane {
    pub const ALL: [Pane; 4] = [Pane::Jobs, Pane::Agents, Pane::Images, Pane::Detail];

    pub fn title(self) -> &'static str {
        match self {
            Pane::Jobs => "Jobs",
            Pane::Agents => "Agents",
            Pane::Images => "Images",
            Pane::Detail => "Detail",
        }
    }

    pub fn next(self, back: bool) -> Pane {
        let i = Pane::ALL.iter().position(|p| *p == self).unwrap_or(0);
        let n = Pane::ALL.len();
        Pane::ALL[if back { (i + n - 1) % n } else { (i + 1) % n }]
    }
}

/// A destructive action waiting for the operator's yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    Cancel(String),
    Reclaim(String),
}

/// What the keyboard is talking to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Help,
    /// Typing the filter; the lists follow as it changes.
    Filter,
    /// Typing the path of a job file to add; `error` is why the last try
    /// failed, `adding` says the writer has it.
    AddJob {
        input: String,
        error: Option<String>,
        adding: bool,
    },
    Confirm(Confirm),
    /// The selected job's log, full screen, `up` lines above its end.
    Log {
        up: usize,
    },
}

/// A line for the operator about the last thing that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub text: String,
    pub error: bool,
}

pub struct App {
    pub spool: LocalSpool,
    /// How the spool is named in the status bar.
    pub spool_label: String,
    /// The time every age and countdown is measured from; set on each tick.
    pub now: Timestamp,
    /// False when `NO_COLOR` asks for none.
    pub color: bool,
    pub state: SpoolState,
    /// Whether the spool has been read at least once.
    pub loaded: bool,
    pub focus: Pane,
    pub mode: Mode,
    pub filter: String,
    /// Indices into `state.jobs` that pass the filter: active jobs first, in
    /// the order agents take them, then finished ones.
    pub job_rows: Vec<usize>,
    /// Where in `job_rows` the finished section starts.
    pub finished_start: usize,
    pub job_cursor: usize,
    /// The id under the cursor, kept so a refresh does not move the selection.
    pub selected_job: Option<String>,
    pub agent_rows: Vec<usize>,
    pub agent_cursor: usize,
    pub image_rows: Vec<usize>,
    pub image_cursor: usize,
    pub detail: Option<Detail>,
    pub detail_scroll: u16,
    pub note: Option<Note>,
    /// The last thing the background reaper did.
    pub reaper_note: Option<Note>,
    /// Changes handed to the spool writer whose outcome has not come back.
    pub pending: usize,
    pub quit: bool,
}

impl App {
    pub fn new(spool_root: impl Into<PathBuf>, now: Timestamp) -> App {
        let root: PathBuf = spool_root.into();
        App {
            spool_label: root.display().to_string(),
            spool: LocalSpool::new(root),
            now,
            color: color_wanted(),
            state: SpoolState::default(),
            loaded: false,
            focus: Pane::Jobs,
            mode: Mode::Normal,
            filter: String::new(),
            job_rows: vec![],
            finished_start: 0,
            job_cursor: 0,
            selected_job: None,
            agent_rows: vec![],
            agent_cursor: 0,
            image_rows: vec![],
            image_cursor: 0,
            detail: None,
            detail_scroll: 0,
            note: None,
            reaper_note: None,
            pending: 0,
            quit: false,
        }
    }

    /// The job under the cursor.
    pub fn selected(&self) -> Option<&JobView> {
        self.job_rows
            .get(self.job_cursor)
            .and_then(|&i| self.state.jobs.get(i))
    }

    pub fn selected_agent(&self) -> Option<&AgentRow> {
        self.agent_rows
            .get(self.agent_cursor)
            .and_then(|&i| self.state.agents.get(i))
    }

    pub fn selected_image(&self) -> Option<&ImageRow> {
        self.image_rows
            .get(self.image_cursor)
            .and_then(|&i| self.state.images.get(i))
    }

    /// The loaded detail, if it is for the selected job.
    pub fn current_detail(&self) -> Option<&Detail> {
        let id = &self.selected()?.id;
        self.detail.as_ref().filter(|d| &d.id == id)
    }

    /// Recomputes the filtered rows after the spool or the filter changed,
    /// keeping the cursor on the same job.
    pub fn refilter(&mut self) {
        let needle = self.filter.to_lowercase();
        let matches = |fields: &[&str]| {
            needle.is_empty() || fields.iter().any(|f| f.to_lowercase().contains(&needle))
        };
        let mut active = Vec::new();
        let mut finished = Vec::new();
        for (i, j) in self.state.jobs.iter().enumerate() {
            let fields = [
                j.id.as_str(),
                j.state.as_str(),
                j.holder.as_deref().unwrap_or(""),
                j.phase.map_or("", |p| p.as_str()),
            ];
            if matches(&fields) {
                if j.state.is_active() {
                    active.push(i);
                } else {
                    finished.push(i);
                }
            }
        }
        self.finished_start = active.len();
        active.extend(finished);
        self.job_rows = active;
        self.job_cursor = match &self.selected_job {
            Some(id) => self
                .job_rows
                .iter()
                .position(|&i| &self.state.jobs[i].id == id)
                .unwrap_or(self.job_cursor),
            None => self.job_cursor,
        };
        self.job_cursor = clamp(self.job_cursor, self.job_rows.len());
        self.selected_job = self.selected().map(|j| j.id.clone());

        self.agent_rows = (0..self.state.agents.len())
            .filter(|&i| {
                let a = &self.state.agents[i];
                matches(&[
                    a.id.as_str(),
                    a.server.as_str(),
                    a.job.as_deref().unwrap_or(""),
                ])
            })
            .collect();
        self.agent_cursor = clamp(self.agent_cursor, self.agent_rows.len());
        self.image_rows = (0..self.state.images.len())
            .filter(|&i| {
                let m = &self.state.images[i];
                matches(&[m.job.as_str(), m.agent.as_str()])
            })
            .collect();
        self.image_cursor = clamp(self.image_cursor, self.image_rows.len());
    }

    /// Puts the cursor on a job by id, if it is listed.
    pub fn select_job(&mut self, id: &str) -> bool {
        match self
            .job_rows
            .iter()
            .position(|&i| self.state.jobs[i].id == id)
        {
            Some(pos) => {
                self.job_cursor = pos;
                self.selected_job = Some(id.to_string());
                self.detail_scroll = 0;
                true
            }
            None => false,
        }
    }

    pub fn set_note(&mut self, text: impl Into<String>, error: bool) {
        self.note = Some(Note {
            text: text.into(),
            error,
        });
    }
}

fn clamp(cursor: usize, len: usize) -> usize {
    cursor.min(len.saturating_sub(1))
}

/// Colour unless `NO_COLOR` is set to something (<https://no-color.org>).
pub fn color_wanted() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
