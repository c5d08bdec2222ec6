//! The master's periodic pass: take in job files dropped into `jobs/`,
//! finish publications a stopped master left half done, publish complete
//! uploads whose token is still the job's lease, then end leases that ran
//! past the master's deadline or whose agent gave up. Everything agents
//! wrote is read through [`crate::untrusted`]; a stray or malformed entry is
//! reported once, removed, and never stops the pass.

use std::io;
use std::path::Path;

use crate::error::IoContext;
use crate::job::parse_job;
use crate::lease::{check_token, Lease};
use crate::master::publish::{self, Staged};
use crate::master::{deploy, signing};
use crate::master::{pin_payloads, write_job_list, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{read_job_list, Entry, EntryState, JobList};
use crate::spool::{
    incoming_dir, job_path, lease_path, SpoolFs, HISTORY, INCOMING, JOBS, LEASES, LOGS,
    SIGNING_KEY, STATUS,
};
use crate::status::AgentState;
use crate::time::Timestamp;
use crate::units::TimeLimit;
use crate::untrusted::{self, Untrusted};
use crate::upload::MANIFEST;

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
    /// Deploy jobs done: (job, image, agent).
    pub deployed: Vec<(String, String, String)>,
    /// What the master did of its own accord (made its signing key).
    pub notes: Vec<String>,
    /// Uploads refused: (job, token, why).
    pub refused: Vec<(String, String, String)>,
    /// Stray or malformed entries in the agents' areas, removed: (path, why).
    pub set_aside: Vec<(String, String)>,
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
        out.extend(self.notes.iter().cloned());
        out.extend(self.published.iter().map(|id| format!("published {id}")));
        out.extend(
            self.deployed
                .iter()
                .map(|(id, image, agent)| format!("deployed {image} onto {agent} ({id})")),
        );
        out.extend(
            self.refused
                .iter()
                .map(|(id, tok, why)| format!("refused upload {id}/{tok}: {why}")),
        );
        out.extend(
            self.set_aside
                .iter()
                .map(|(path, why)| format!("set aside {path}: {why}")),
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

/// One pass for a caller that already holds the masters' lock throughout.
pub fn reap(fs: &dyn SpoolFs, now: Timestamp) -> Result<ReapReport> {
    pass(fs, &|| Ok(()), &|| now)
}

/// One pass on a local spool that takes the masters' lock itself, only for
/// as long as each change needs it (see [`pass`]).
pub fn reap_locking(spool: &crate::LocalSpool, now: &dyn Fn() -> Timestamp) -> Result<ReapReport> {
    pass(spool, &|| spool.lock(), now)
}

/// One pass of the reaper and publisher. `lock` takes the masters' lock:
/// the pass holds it for every change to the job list and the leases, and
/// lets go of it while it verifies and copies uploads, which may take
/// minutes for a large image, so that the operator's console and CLI are
/// never kept waiting. `now` is the clock, read at each locked step.
pub fn pass<G>(
    fs: &dyn SpoolFs,
    lock: &dyn Fn() -> io::Result<G>,
    now: &dyn Fn() -> Timestamp,
) -> Result<ReapReport> {
    let mut report = ReapReport::default();
    let take = || lock().ctx(|| "taking the masters' lock".to_string());

    let candidates = {
        let _guard = take()?;
        let now = now();
        let mut list = read_job_list(fs)?;
        // Every change below writes the job list before it removes a lease,
        // and an unchanged list is not written at all, so an idle pass costs
        // reads only.
        let mut changed = ingest(fs, &mut list, now, &mut report)?;
        changed |= publish::finish_published(fs, &mut list, now, &mut report)?;
        changed |= record_leases(fs, &mut list, now, &mut report)?;
        if changed {
            write_job_list(fs, &list)?;
        }
        sweep(fs, STATUS, ".toml", &mut report)?;
        sweep(fs, LOGS, ".log", &mut report)?;
        complete_uploads(fs, &list, &mut report)?
    };

    // Verification and the copy into images/ run without the lock: nothing
    // is visible until the locked step below renames it into place. The
    // signing key is read (or made, exclusively) here too. Without a usable
    // key nothing is published and the uploads wait for the next pass.
    let key = if candidates.is_empty() {
        None
    } else {
        match signing::load_or_create_key(fs) {
            Ok((key, created)) => {
                if created {
                    report.notes.push(format!(
                        "created the image signing key {SIGNING_KEY} ({})",
                        key.fingerprint()
                    ));
                }
                Some(Ok(key))
            }
            Err(e) => Some(Err(e)),
        }
    };
    let staged: Vec<(Lease, std::result::Result<Staged, String>)> = match &key {
        Some(Ok(key)) => candidates
            .into_iter()
            .map(|(lease, job_blake3)| {
                let r = publish::stage(fs, &lease, &job_blake3, key, now());
                (lease, r)
            })
            .collect(),
        _ => Vec::new(),
    };

    let _guard = take()?;
    let now = now();
    let mut list = read_job_list(fs)?;
    // Uploads first: a complete upload from the current lease is published
    // even if the lease ran out while the master was away.
    for (lease, outcome) in staged {
        publish::commit(fs, &mut list, &lease, outcome, now, &mut report)?;
    }
    deploy::finish_deploys(fs, &mut list, now, &mut report)?;
    reap_leases(fs, &mut list, now, &mut report)?;
    if let Some(Err(e)) = key {
        return Err(e);
    }
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
        let bytes = match fs.read_capped(&path, crate::job::MAX_JOB_BYTES as u64) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => {
                report.set_aside.push((path.clone(), e.to_string()));
                continue;
            }
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
        let entry = match outcome {
            Ok((spec, pinned)) => {
                if pinned != text {
                    fs.write_atomic(&path, pinned.as_bytes())
                        .ctx(|| format!("writing {path}"))?;
                }
                report.ingested.push(id.to_string());
                Entry::queued(&spec, &pinned, now)
            }
            Err(why) => {
                report.invalid.push((id.to_string(), why.clone()));
                Entry {
                    id: id.to_string(),
                    priority: 0,
                    seq: 0,
                    state: EntryState::Invalid,
                    attempts: 0,
                    max_attempts: 1,
                    time_limit: TimeLimit::default(),
                    submitted: now,
                    blake3: blake3::hash(&bytes).to_hex().to_string(),
                    message: why,
                    lease: None,
                }
            }
        };
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
            // The master counts attempts itself: the lease's own count is
            // the agent's word.
            e.attempts = e.attempts.saturating_add(1);
            e.lease = None;
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
    fs.remove_dir_all(&path)
        .ctx(|| format!("removing {path}"))?;
    if check_token(&lease.token).is_ok() {
        tidy(fs, &incoming_dir(&lease.job, &lease.token));
    }
    Ok(state)
}

/// Removes what an ended lease left behind. The job's state is already
/// written, so a failure here (a disk error, or a master that is not root
/// facing a directory an agent made) is logged, not fatal: the next pass
/// finds the leftover and sets it aside.
pub(crate) fn tidy(fs: &dyn SpoolFs, path: &str) {
    if let Err(e) = fs.remove_dir_all(path) {
        tracing::warn!("removing {path}: {e}");
    }
}

/// Records each valid lease of a queued job in the job list, so that its
/// deadline counts from when the master first saw it. Malformed leases and
/// stray entries in `leases/` are removed and reported.
fn record_leases(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<bool> {
    let mut changed = false;
    for (id, lease) in leases(fs, report)? {
        if let Some(e) = list.get_mut(&id) {
            if e.state == EntryState::Queued {
                changed |= e.record_lease(&lease.token, now);
            }
        }
    }
    Ok(changed)
}

/// The valid leases in `leases/`, by job id. Anything else there is removed
/// and reported: an agent can always claim again with a well-formed lease.
fn leases(fs: &dyn SpoolFs, report: &mut ReapReport) -> Result<Vec<(String, Lease)>> {
    let mut out = Vec::new();
    for name in fs.list(LEASES).ctx(|| format!("listing {LEASES}/"))? {
        let path = lease_path(&name);
        let why = match check_job_id(&name) {
            Err(p) => format!("not a job id: {p}"),
            Ok(()) => match untrusted::lease(fs, &name) {
                Ok(Some(lease)) => {
                    out.push((name, lease));
                    continue;
                }
                Ok(None) => continue,
                Err(Untrusted::Bad { problem, .. }) => problem,
                Err(Untrusted::Io { what, source }) => {
                    // Not the agent's doing: leave it for the next pass.
                    report.set_aside.push((path, format!("{what}: {source}")));
                    continue;
                }
            },
        };
        set_aside(fs, &path, why, report);
    }
    Ok(out)
}

/// Removes a stray or malformed entry an agent left and reports it once.
fn set_aside(fs: &dyn SpoolFs, path: &str, why: String, report: &mut ReapReport) {
    let why = match fs.remove_dir_all(path) {
        Ok(()) => why,
        Err(e) => format!("{why} (and removing it failed: {e})"),
    };
    tracing::warn!("set aside {path}: {why}");
    report.set_aside.push((path.to_string(), why));
}

/// Removes entries of an agent-written directory whose names are not
/// `<job id><suffix>` or that are not regular files.
fn sweep(fs: &dyn SpoolFs, dir: &str, suffix: &str, report: &mut ReapReport) -> Result<()> {
    for name in fs.list(dir).ctx(|| format!("listing {dir}/"))? {
        let path = format!("{dir}/{name}");
        let why = match name.strip_suffix(suffix).map(check_job_id) {
            None => format!("not named <job id>{suffix}"),
            Some(Err(p)) => format!("not a job id: {p}"),
            // Opening refuses anything but a regular file reached without
            // a symlink; the content is checked where it is read.
            Some(Ok(())) => match fs.open_read(&path) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => e.to_string(),
            },
        };
        set_aside(fs, &path, why, report);
    }
    Ok(())
}

/// Complete uploads (their manifest is there) from the current lease of a
/// queued job, with the job file's pinned hash; removes every other
/// directory in `incoming/`: uploads of reaped leases and strays.
fn complete_uploads(
    fs: &dyn SpoolFs,
    list: &JobList,
    report: &mut ReapReport,
) -> Result<Vec<(Lease, String)>> {
    let mut out = Vec::new();
    for id in fs.list(INCOMING).ctx(|| format!("listing {INCOMING}/"))? {
        let dir = format!("{INCOMING}/{id}");
        if let Err(p) = check_job_id(&id) {
            set_aside(fs, &dir, format!("not a job id: {p}"), report);
            continue;
        }
        // An unreadable lease does not count as no lease: that would delete
        // the holder's upload. The lease pass removes it; the upload goes
        // with the next pass.
        let lease = match untrusted::lease(fs, &id) {
            Ok(l) => l,
            Err(_) => continue,
        };
        let entry = list.get(&id).filter(|e| e.state == EntryState::Queued);
        let tokens = match fs.list(&dir) {
            Ok(t) => t,
            Err(e) => {
                set_aside(fs, &dir, e.to_string(), report);
                continue;
            }
        };
        for token in tokens {
            let upload = incoming_dir(&id, &token);
            let current = lease
                .as_ref()
                .filter(|l| l.token == token && check_token(&token).is_ok());
            let (Some(lease), Some(entry)) = (current, entry) else {
                // Not the job's lease: a holder that was reaped, or a stray.
                // It can never be published.
                let complete = fs.exists(&format!("{upload}/{MANIFEST}")).unwrap_or(false);
                set_aside(
                    fs,
                    &upload,
                    "its token is not the current lease of a queued job".into(),
                    report,
                );
                if complete {
                    report.refused.push((
                        id.clone(),
                        token.clone(),
                        "its token is not the job's current lease".into(),
                    ));
                }
                continue;
            };
            if fs
                .exists(&format!("{upload}/{MANIFEST}"))
                .ctx(|| format!("reading {upload}"))?
            {
                out.push((lease.clone(), entry.blake3.clone()));
            }
        }
        if lease.is_none() || entry.is_none() {
            // Nothing can be uploaded here now, and the tokens went above:
            // the directory goes too. A known job leaves it behind when its
            // lease ends; for anything else it is a stray.
            if fs.list(&dir).is_ok_and(|t| t.is_empty()) {
                if list.get(&id).is_some() {
                    tidy(fs, &dir);
                } else {
                    set_aside(fs, &dir, "an upload directory for no job".into(), report);
                }
            }
        }
    }
    Ok(out)
}

/// Ends the leases that ran past the master's deadline for them, whose
/// agent gave up, or whose job is no longer queued.
fn reap_leases(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<()> {
    for (id, lease) in leases(fs, report)? {
        let entry = list.get(&id).filter(|e| e.state == EntryState::Queued);
        let status = untrusted::status_of(fs, &lease);
        let why = match entry {
            None => Some("the job is no longer queued".to_string()),
            Some(e) => {
                let deadline = e.deadline(&lease.token, now);
                if now >= deadline {
                    Some(format!("lease of {} expired at {deadline}", lease.agent))
                } else {
                    status
                        .filter(|s| s.state == AgentState::Failed)
                        .map(|s| format!("{} failed in {}: {}", lease.agent, s.phase, s.message))
                }
            }
        };
        if let Some(why) = why {
            let state = release(fs, list, &lease, &why)?;
            report.released.push((id, state, why));
        }
    }
    Ok(())
}
