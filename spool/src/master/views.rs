//! The jobs as the operator sees them: the job list joined with each job's
//! lease and heartbeat, then the finished jobs from `history/`.

use serde::Serialize;

use crate::error::IoContext;
use crate::lease::Lease;
use crate::master::{HistoryRecord, JobState, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{read_job_list, Entry, EntryState};
use crate::spool::{history_path, SpoolFs, HISTORY};
use crate::status::{AgentState, Phase, Status};
use crate::time::Timestamp;
use crate::untrusted;

/// One job as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub id: String,
    pub priority: u32,
    pub state: JobState,
    /// Agent holding the lease, or that built the image for done jobs.
    pub holder: Option<String>,
    pub phase: Option<Phase>,
    pub progress: Option<f32>,
    /// Bytes of the phase done and in all, when the phase counts them.
    pub bytes: Option<(u64, u64)>,
    pub deadline: Option<Timestamp>,
    /// Seconds left on the lease at the time of the view.
    pub remaining: Option<i64>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub submitted: Timestamp,
    pub message: String,
    #[serde(skip)]
    pub lease: Option<Lease>,
    #[serde(skip)]
    pub status: Option<Status>,
}

pub(crate) fn view_entry(fs: &dyn SpoolFs, e: &Entry, now: Timestamp) -> Result<JobView> {
    // What the agent wrote is read through the untrusted reader; its
    // deadline and attempt are replaced by the master's own.
    let lease = untrusted::lease(fs, &e.id).ok().flatten().map(|mut l| {
        l.deadline = e.deadline(&l.token, now);
        l.attempt = e.attempts.saturating_add(1);
        l
    });
    let status = lease.as_ref().and_then(|l| untrusted::status_of(fs, l));
    let state = match (e.state, &lease, &status) {
        (EntryState::Queued, Some(_), Some(s))
            if matches!(s.state, AgentState::Uploading | AgentState::Uploaded) =>
        {
            JobState::Uploading
        }
        (EntryState::Queued, Some(_), _) => JobState::Leased,
        (EntryState::Queued, None, _) => JobState::Queued,
        (EntryState::Failed, ..) => JobState::Failed,
        (EntryState::Invalid, ..) => JobState::Invalid,
        (EntryState::Cancelled, ..) => JobState::Cancelled,
    };
    Ok(JobView {
        id: e.id.clone(),
        priority: e.priority,
        state,
        holder: lease.as_ref().map(|l| l.agent.clone()),
        phase: status.as_ref().map(|s| s.phase),
        progress: status.as_ref().map(|s| s.progress),
        bytes: status
            .as_ref()
            .filter(|s| s.bytes_total > 0)
            .map(|s| (s.bytes_done, s.bytes_total)),
        deadline: lease.as_ref().map(|l| l.deadline),
        remaining: lease.as_ref().map(|l| l.remaining(now)),
        attempts: e.attempts,
        max_attempts: e.max_attempts,
        submitted: e.submitted,
        message: status
            .as_ref()
            .map(|s| s.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| e.message.clone()),
        lease,
        status,
    })
}

fn view_history(h: &HistoryRecord) -> JobView {
    JobView {
        id: h.entry.id.clone(),
        priority: h.entry.priority,
        state: JobState::Done,
        holder: Some(h.agent.clone()),
        phase: None,
        progress: None,
        bytes: None,
        deadline: None,
        remaining: None,
        attempts: h.entry.attempts,
        max_attempts: h.entry.max_attempts,
        submitted: h.entry.submitted,
        message: h.entry.message.clone(),
        lease: None,
        status: h.status.clone(),
    }
}

/// Finished jobs from `history/`, oldest first. Unreadable records are skipped.
pub fn read_history(fs: &dyn SpoolFs) -> Result<Vec<HistoryRecord>> {
    let mut out = Vec::new();
    for name in fs.list(HISTORY).ctx(|| format!("listing {HISTORY}/"))? {
        let Some(id) = name.strip_suffix(".toml") else {
            continue;
        };
        let path = history_path(id);
        let Some(bytes) = fs.read_opt(&path).ctx(|| format!("reading {path}"))? else {
            continue;
        };
        match HistoryRecord::parse(&String::from_utf8_lossy(&bytes)) {
            Ok(h) => out.push(h),
            Err(e) => tracing::warn!("skipping {path}: {e}"),
        }
    }
    out.sort_by_key(|h| h.finished);
    Ok(out)
}

/// Every job: the job list in priority order, then finished jobs.
pub fn job_views(fs: &dyn SpoolFs, now: Timestamp) -> Result<Vec<JobView>> {
    let list = read_job_list(fs)?;
    let mut views = list
        .jobs
        .iter()
        .map(|e| view_entry(fs, e, now))
        .collect::<Result<Vec<_>>>()?;
    views.extend(read_history(fs)?.iter().map(view_history));
    Ok(views)
}

pub fn job_view(fs: &dyn SpoolFs, id: &str, now: Timestamp) -> Result<JobView> {
    check_job_id(id).map_err(|p| MasterError::BadInput(format!("job id {p}")))?;
    let list = read_job_list(fs)?;
    if let Some(e) = list.get(id) {
        return view_entry(fs, e, now);
    }
    read_history(fs)?
        .iter()
        .find(|h| h.entry.id == id)
        .map(view_history)
        .ok_or_else(|| MasterError::NoSuchJob(id.into()))
}
