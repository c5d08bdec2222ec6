//! The master's periodic pass: take in job files dropped into `jobs/`, end
//! leases that ran past their deadline or whose agent gave up, and publish
//! complete uploads whose token is still the job's lease.

use std::path::Path;

use crate::error::{IoContext, SpoolError};
use crate::job::parse_job;
use crate::lease::{check_token, read_lease, Lease};
use crate::master::publish::publish_uploads;
use crate::master::{pin_payloads, write_job_list, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{read_job_list, Entry, EntryState, JobList};
use crate::spool::{incoming_dir, job_path, lease_path, SpoolFs, HISTORY, JOBS, LEASES};
use crate::status::{read_status, AgentState};
use crate::time::Timestamp;
use crate::units::TimeLimit;

/// What one pass did, for the log and the operator.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReapReport {
    /// Job files found in `jobs/` and queued.
    pub ingested: Vec<String>,
    /// Job files found in `jobs/` that failed validation: (id, error).
    pub invalid: Vec<(String, String)>,
    /// Leases ended: (job, new state, why).
    pub released: Vec<(String, EntryState, String)>,
    pub published: Vec<String>,
    /// Uploads refused: (job, token, why).
    pub refused: Vec<(String, String, String)>,
}

impl ReapReport {
    pub fn is_empty(&self) -> bool {
        *self == ReapReport::default()
    }

    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.ingested
                .iter()
                .map(|id| format!("queued {id} (found in jobs/)")),
        );
        out.extend(
            self.invalid
                .iter()
                .map(|(id, why)| format!("invalid {id}: {why}")),
        );
        out.extend(
            self.released
                .iter()
                .map(|(id, st, why)| format!("{id} -> {}: {why}", state_word(*st))),
        );
        out.extend(self.published.iter().map(|id| format!("published {id}")));
        out.extend(
            self.refused
                .iter()
                .map(|(id, tok, why)| format!("refused upload {id}/{tok}: {why}")),
        );
        out
    }
}

fn state_word(s: EntryState) -> &'static str {
    match s {
        EntryState::Queued => "queued",
        EntryState::Failed => "failed",
        EntryState::Invalid => "invalid",
        EntryState::Cancelled => "cancelled",
    }
}

/// One pass of the reaper and publisher. The caller holds the master lock.
pub fn reap(fs: &dyn SpoolFs, now: Timestamp) -> Result<ReapReport> {
    let mut report = ReapReport::default();
    let mut list = read_job_list(fs)?;
    // Every change below writes the job list before it removes a lease, and
    // an unchanged list is not written at all, so an idle pass costs reads only.
    if ingest(fs, &mut list, now, &mut report)? {
        write_job_list(fs, &list)?;
    }
    // Ended leases are gone before publishing, so an upload from one of
    // them can never be published below.
    reap_leases(fs, &mut list, now, &mut report)?;
    publish_uploads(fs, &mut list, now, &mut report)?;
    Ok(report)
}

fn ingest(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<bool> {
    let known: std::collections::HashSet<String> = list
        .jobs
        .iter()
        .map(|e| format!("{}.toml", e.id))
        .chain(fs.list(HISTORY).ctx(|| format!("listing {HISTORY}/"))?)
        .collect();
    let mut changed = false;
    for name in fs.list(JOBS).ctx(|| format!("listing {JOBS}/"))? {
        if known.contains(&name) {
            continue;
        }
        let Some(id) = name.strip_suffix(".toml") else {
            continue;
        };
        if check_job_id(id).is_err() {
            continue;
        }
        changed = true;
        let path = job_path(id);
        let Some(bytes) = fs.read_opt(&path).ctx(|| format!("reading {path}"))? else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let outcome = parse_job(&text)
            .map_err(MasterError::from)
            .and_then(|spec| {
                if spec.id != id {
                    return Err(MasterError::BadInput(format!(
                        "id: {:?} differs from the file name {name:?}",
                        spec.id
                    )));
                }
                let pinned = pin_payloads(fs, &text, &spec)?;
                Ok((spec, pinned))
            })
            .map_err(|e| match e {
                MasterError::Job(j) => j.in_file(Path::new(&path)).to_string(),
                other => format!("{path}: {other}"),
            });
        let mut entry = Entry {
            id: id.to_string(),
            priority: 0,
            seq: 0,
            state: EntryState::Invalid,
            attempts: 0,
            max_attempts: 1,
            time_limit: TimeLimit::default(),
            submitted: now,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            message: String::new(),
        };
        match outcome {
            Ok((spec, pinned)) => {
                if pinned != text {
                    fs.write_atomic(&path, pinned.as_bytes())
                        .ctx(|| format!("writing {path}"))?;
                }
                entry.priority = spec.priority;
                entry.state = EntryState::Queued;
                entry.max_attempts = spec.max_attempts;
                entry.time_limit = spec.time_limit;
                entry.blake3 = blake3::hash(pinned.as_bytes()).to_hex().to_string();
                report.ingested.push(id.to_string());
            }
            Err(why) => {
                entry.message = why.clone();
                report.invalid.push((id.to_string(), why));
            }
        }
        list.push(entry);
    }
    Ok(changed)
}

/// Ends a lease: the attempt counts, and the job goes back to the queue or,
/// out of attempts, to `failed`. The holder's partial upload is dropped.
pub fn release(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    lease: &Lease,
    why: &str,
) -> Result<EntryState> {
    let state = match list.get_mut(&lease.job) {
        Some(e) if e.state == EntryState::Queued => {
            e.attempts = e.attempts.max(lease.attempt);
            e.state = if e.attempts >= e.max_attempts {
                EntryState::Failed
            } else {
                EntryState::Queued
            };
            e.message = if e.state == EntryState::Failed {
                format!(
                    "{why}; no attempts left ({} of {})",
                    e.attempts, e.max_attempts
                )
            } else {
                why.to_string()
            };
            e.state
        }
        Some(e) => e.state,
        None => EntryState::Cancelled,
    };
    // The job list first, the lease after: a claimer that reads the list
    // after creating its lease then sees the job's new state (see
    // `claim::claim_next`).
    write_job_list(fs, list)?;
    let path = lease_path(&lease.job);
    fs.remove(&path).ctx(|| format!("removing {path}"))?;
    if check_token(&lease.token).is_ok() {
        let dir = incoming_dir(&lease.job, &lease.token);
        fs.remove_dir_all(&dir).ctx(|| format!("removing {dir}"))?;
    }
    Ok(state)
}

fn reap_leases(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<()> {
    for id in fs.list(LEASES).ctx(|| format!("listing {LEASES}/"))? {
        if check_job_id(&id).is_err() {
            continue;
        }
        let lease = match read_lease(fs, &id) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(SpoolError::Corrupt { path, problem }) => {
                fs.remove(&path).ctx(|| format!("removing {path}"))?;
                report.released.push((
                    id.clone(),
                    EntryState::Queued,
                    format!("removed unreadable lease {path}: {problem}"),
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let still_queued = list.get(&id).is_some_and(|e| e.state == EntryState::Queued);
        let status = read_status(fs, &id)
            .unwrap_or(None)
            .filter(|s| s.token == lease.token);
        let why = if !still_queued {
            Some("the job is no longer queued".to_string())
        } else if lease.expired(now) {
            Some(format!(
                "lease of {} expired at {}",
                lease.agent, lease.deadline
            ))
        } else if let Some(s) = status.filter(|s| s.state == AgentState::Failed) {
            Some(format!(
                "{} failed in {}: {}",
                lease.agent, s.phase, s.message
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let state = release(fs, list, &lease, &why)?;
            report.released.push((id, state, why));
        }
    }
    Ok(())
}
