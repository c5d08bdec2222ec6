//! The master's side of the spool rules: submit, reorder, cancel, requeue,
//! and the job views that `list`, `show` and the TUI present. Callers on a
//! local spool hold [`crate::LocalSpool::lock`] around every change.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::claim::{read_job_list, read_lease, read_status, IoContext, SpoolError};
use crate::job::{parse_job, JobError, JobSpec, MAX_PRIORITY};
use crate::lease::Lease;
use crate::names::check_job_id;
use crate::queue::{Entry, EntryState, JobList};
use crate::spool::{
    history_path, image_dir, job_path, lease_path, payload_path, SpoolFs, DIRS, HISTORY, JOB_LIST,
};
use crate::status::{AgentState, Status};
use crate::time::Timestamp;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("no job {0:?} in the spool")]
    NoSuchJob(String),
    #[error("job {0:?} already exists")]
    Exists(String),
    #[error("job {id:?} is {state}; {action} needs {wanted}")]
    WrongState {
        id: String,
        state: JobState,
        action: &'static str,
        wanted: &'static str,
    },
    #[error("{0}")]
    BadInput(String),
}

impl MasterError {
    /// True when the fault is in what the user gave (exit 2), not in doing it (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            MasterError::Job(_)
                | MasterError::NoSuchJob(_)
                | MasterError::Exists(_)
                | MasterError::BadInput(_)
        )
    }
}

pub type Result<T, E = MasterError> = std::result::Result<T, E>;

/// Every state a job can be seen in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Leased,
    Uploading,
    Done,
    Failed,
    Invalid,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Leased,
        JobState::Uploading,
        JobState::Done,
        JobState::Failed,
        JobState::Invalid,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Leased => "leased",
            JobState::Uploading => "uploading",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Invalid => "invalid",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Still in play: queued, or held by an agent.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Leased | JobState::Uploading
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finished job, kept in `history/<id>.toml` once it leaves `jobs.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRecord {
    pub entry: Entry,
    pub finished: Timestamp,
    pub agent: String,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl HistoryRecord {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a history record always serializes")
    }
}

/// One job as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub id: String,
    pub priority: u32,
    pub state: JobState,
    /// Agent holding the lease, or that built the image for done jobs.
    pub holder: Option<String>,
    pub phase: Option<String>,
    pub progress: Option<f32>,
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

/// Creates the spool's directories and an empty job list; leaves what exists.
pub fn init(fs: &dyn SpoolFs) -> Result<()> {
    for d in DIRS {
        fs.mkdir_all(d).ctx(|| format!("creating {d}/"))?;
    }
    if !fs.exists(JOB_LIST).ctx(|| format!("reading {JOB_LIST}"))? {
        write_job_list(fs, &JobList::default())?;
    }
    Ok(())
}

pub fn write_job_list(fs: &dyn SpoolFs, list: &JobList) -> Result<()> {
    fs.write_atomic(JOB_LIST, list.to_toml().as_bytes())
        .ctx(|| format!("writing {JOB_LIST}"))?;
    Ok(())
}

/// BLAKE3 of a payload in the spool, streamed; `None` if it is missing.
pub fn hash_payload(fs: &dyn SpoolFs, name: &str) -> Result<Option<String>> {
    let path = payload_path(name);
    let mut r = match fs.open_read(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SpoolError::Io {
                what: format!("opening {path}"),
                source: e,
            }
            .into())
        }
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).ctx(|| format!("reading {path}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Some(h.finalize().to_hex().to_string()))
}

/// Fills in each payload's `blake3` from the spool, or checks the one given.
/// Returns the job text with the hashes pinned (comments and layout kept).
pub fn pin_payloads(fs: &dyn SpoolFs, text: &str, spec: &JobSpec) -> Result<String> {
    let mut doc: toml_edit::DocumentMut =
        text.parse().map_err(|e: toml_edit::TomlError| JobError {
            file: None,
            field: String::new(),
            problem: e.to_string(),
        })?;
    for (i, p) in spec.payloads.iter().enumerate() {
        let field = format!("payloads[{i}].blake3");
        let actual = hash_payload(fs, &p.name)?.ok_or_else(|| JobError {
            file: None,
            field: format!("payloads[{i}].name"),
            problem: format!(
                "{:?} is not in the spool's payloads/ (add it with `kiln-master payload add`)",
                p.name
            ),
        })?;
        match &p.blake3 {
            Some(given) if *given != actual => {
                return Err(JobError {
                    file: None,
                    field,
                    problem: format!(
                        "{given} does not match payloads/{}, whose BLAKE3 is {actual}",
                        p.name
                    ),
                }
                .into())
            }
            Some(_) => {}
            None => {
                let table = doc["payloads"]
                    .as_array_of_tables_mut()
                    .and_then(|a| a.get_mut(i))
                    .ok_or_else(|| {
                        MasterError::BadInput(format!(
                            "{field}: payloads must be written as [[payloads]] tables"
                        ))
                    })?;
                table["blake3"] = toml_edit::value(actual);
            }
        }
    }
    Ok(doc.to_string())
}

/// Validates a job file's text, pins its payloads and queues it.
pub fn add_job(fs: &dyn SpoolFs, text: &str, file: &Path, now: Timestamp) -> Result<Entry> {
    let spec = parse_job(text).map_err(|e| e.in_file(file))?;
    let pinned = pin_payloads(fs, text, &spec).map_err(|e| match e {
        MasterError::Job(j) => MasterError::Job(j.in_file(file)),
        other => other,
    })?;
    let mut list = read_job_list(fs)?;
    if list.get(&spec.id).is_some()
        || fs
            .exists(&history_path(&spec.id))
            .ctx(|| format!("reading {HISTORY}/"))?
        || fs
            .exists(&image_dir(&spec.id))
            .ctx(|| "reading images/".into())?
    {
        return Err(MasterError::Exists(spec.id));
    }
    let path = job_path(&spec.id);
    fs.write_atomic(&path, pinned.as_bytes())
        .ctx(|| format!("writing {path}"))?;
    let entry = Entry {
        id: spec.id.clone(),
        priority: spec.priority,
        seq: 0,
        state: EntryState::Queued,
        attempts: 0,
        max_attempts: spec.max_attempts,
        time_limit: spec.time_limit,
        submitted: now,
        blake3: blake3::hash(pinned.as_bytes()).to_hex().to_string(),
        message: String::new(),
    };
    list.push(entry);
    write_job_list(fs, &list)?;
    Ok(list.get(&spec.id).cloned().expect("just added"))
}

/// Reads a job's spec as stored in the spool.
pub fn read_job_spec(fs: &dyn SpoolFs, id: &str) -> Result<(String, JobSpec)> {
    check_job_id(id).map_err(|p| MasterError::BadInput(format!("job id {p}")))?;
    let path = job_path(id);
    let bytes = fs
        .read_opt(&path)
        .ctx(|| format!("reading {path}"))?
        .ok_or_else(|| MasterError::NoSuchJob(id.into()))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let spec = parse_job(&text).map_err(|e| e.in_file(Path::new(&path)))?;
    Ok((text, spec))
}

fn view_entry(fs: &dyn SpoolFs, e: &Entry, now: Timestamp) -> Result<JobView> {
    // A lease that cannot be read still holds the job until `reap` clears it.
    let lease = read_lease(fs, &e.id).unwrap_or(None);
    let status = read_status(fs, &e.id)
        .unwrap_or(None)
        .filter(|s| lease.as_ref().is_some_and(|l| l.token == s.token));
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
        phase: status.as_ref().map(|s| s.phase.clone()),
        progress: status.as_ref().map(|s| s.progress),
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

fn entry_mut<'a>(list: &'a mut JobList, id: &str) -> Result<&'a mut Entry> {
    list.get_mut(id)
        .ok_or_else(|| MasterError::NoSuchJob(id.into()))
}

pub fn set_priority(fs: &dyn SpoolFs, id: &str, priority: u32) -> Result<()> {
    if priority > MAX_PRIORITY {
        return Err(MasterError::BadInput(format!(
            "priority {priority} is out of range 0..={MAX_PRIORITY}"
        )));
    }
    let mut list = read_job_list(fs)?;
    entry_mut(&mut list, id)?.priority = priority;
    list.sort();
    write_job_list(fs, &list)
}

/// Moves a queued job one place up or down in the order agents take jobs.
pub fn shift(fs: &dyn SpoolFs, id: &str, up: bool) -> Result<Option<u32>> {
    let mut list = read_job_list(fs)?;
    entry_mut(&mut list, id)?;
    let moved = list.shift(id, up);
    if moved.is_some() {
        write_job_list(fs, &list)?;
    }
    Ok(moved)
}

/// Cancels a job; a holder finds its lease gone and stops.
pub fn cancel(fs: &dyn SpoolFs, id: &str, now: Timestamp) -> Result<()> {
    let mut list = read_job_list(fs)?;
    let view = view_entry(fs, entry_mut(&mut list, id)?, now)?;
    let e = entry_mut(&mut list, id)?;
    if e.state != EntryState::Queued {
        return Err(MasterError::WrongState {
            id: id.into(),
            state: view.state,
            action: "cancel",
            wanted: "a queued or leased job",
        });
    }
    e.state = EntryState::Cancelled;
    e.message = format!("cancelled at {now}");
    write_job_list(fs, &list)?;
    let path = lease_path(id);
    fs.remove(&path).ctx(|| format!("removing {path}"))?;
    Ok(())
}

/// Puts a failed, invalid or cancelled job back in the queue with its
/// attempts reset. An invalid job is validated again first.
pub fn requeue(fs: &dyn SpoolFs, id: &str, now: Timestamp) -> Result<()> {
    let mut list = read_job_list(fs)?;
    let view = view_entry(fs, entry_mut(&mut list, id)?, now)?;
    if !matches!(
        view.state,
        JobState::Failed | JobState::Invalid | JobState::Cancelled
    ) {
        return Err(MasterError::WrongState {
            id: id.into(),
            state: view.state,
            action: "requeue",
            wanted: "a failed, invalid or cancelled job",
        });
    }
    let (_, spec) = read_job_spec(fs, id)?;
    let e = entry_mut(&mut list, id)?;
    e.state = EntryState::Queued;
    e.attempts = 0;
    e.max_attempts = spec.max_attempts;
    e.time_limit = spec.time_limit;
    e.message = format!("requeued at {now}");
    write_job_list(fs, &list)
}

/// Ends a lease now, as if its deadline had passed: the attempt counts.
pub fn reclaim(fs: &dyn SpoolFs, id: &str, now: Timestamp) -> Result<EntryState> {
    let lease = read_lease(fs, id)?
        .ok_or_else(|| MasterError::BadInput(format!("job {id:?} has no lease")))?;
    let mut list = read_job_list(fs)?;
    let state = crate::publish::release(
        fs,
        &mut list,
        &lease,
        &format!(
            "lease of {} reclaimed by the operator at {now}",
            lease.agent
        ),
    )?;
    Ok(state)
}

/// Pushes a lease's deadline back by `by`.
pub fn extend(fs: &dyn SpoolFs, id: &str, by: std::time::Duration) -> Result<Lease> {
    let mut lease = read_lease(fs, id)?
        .ok_or_else(|| MasterError::BadInput(format!("job {id:?} has no lease")))?;
    lease.deadline = lease.deadline.plus(by);
    let path = lease_path(id);
    fs.write_atomic(&path, lease.to_toml().as_bytes())
        .ctx(|| format!("writing {path}"))?;
    Ok(lease)
}
