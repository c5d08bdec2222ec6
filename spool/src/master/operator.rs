//! The operator's actions on the job list: submit, reorder, cancel,
//! requeue, reclaim and extend a lease.

use std::path::Path;
use std::time::Duration;

use crate::error::{IoContext, SpoolError};
use crate::job::{parse_job, JobError, JobSpec, MAX_PRIORITY};
use crate::lease::Lease;
use crate::master::views::view_entry;
use crate::master::{write_job_list, JobState, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{read_job_list, Entry, EntryState, JobList};
use crate::spool::{history_path, image_dir, job_path, lease_path, payload_path, SpoolFs, HISTORY};
use crate::stream;
use crate::time::Timestamp;
use crate::units::TimeLimit;
use crate::untrusted;

/// BLAKE3 of a payload in the spool, streamed; `None` if it is missing.
pub fn hash_payload(fs: &dyn SpoolFs, name: &str) -> Result<Option<String>> {
    let path = payload_path(name);
    let r = match fs.open_read(&path) {
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
    let d = stream::digest(r).ctx(|| format!("reading {path}"))?;
    Ok(Some(d.blake3))
}

/// Fills in each payload's `blake3` from the spool, or checks the one given;
/// for a deploy job, checks that its image is published and pins the
/// publication's manifest (see [`crate::master::deploy::pin_deploy`]).
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
    if let Some(deploy) = &spec.deploy {
        crate::master::deploy::pin_deploy(fs, &mut doc, deploy)?;
    }
    // Pinning adds text: the job must still be within every bound.
    let pinned = doc.to_string();
    parse_job(&pinned)?;
    Ok(pinned)
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
    let entry = Entry::queued(&spec, &pinned, now);
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
    e.lease = None;
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
    e.lease = None;
    e.max_attempts = spec.max_attempts;
    e.time_limit = spec.time_limit;
    e.message = format!("requeued at {now}");
    write_job_list(fs, &list)
}

/// Ends a lease now, as if its deadline had passed: the attempt counts.
pub fn reclaim(fs: &dyn SpoolFs, id: &str, now: Timestamp) -> Result<EntryState> {
    let lease = held(fs, id)?;
    let mut list = read_job_list(fs)?;
    let state = crate::master::reaper::release(
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

/// The job's lease, read as the hostile input it is.
fn held(fs: &dyn SpoolFs, id: &str) -> Result<Lease> {
    check_job_id(id).map_err(|p| MasterError::BadInput(format!("job id {p}")))?;
    untrusted::lease(fs, id)?
        .ok_or_else(|| MasterError::BadInput(format!("job {id:?} has no lease")))
}

/// Pushes a lease's deadline back by `by`, in the master's records (the
/// lease file is the agent's and is not trusted for its deadline). A lease
/// can be extended by at most [`TimeLimit::MAX`] in all. Returns the lease
/// with the master's new deadline.
pub fn extend(fs: &dyn SpoolFs, id: &str, by: Duration, now: Timestamp) -> Result<Lease> {
    let mut lease = held(fs, id)?;
    let mut list = read_job_list(fs)?;
    let e = entry_mut(&mut list, id)?;
    if e.state != EntryState::Queued {
        return Err(MasterError::BadInput(format!(
            "job {id:?} is no longer queued; its lease ends at the next reap pass"
        )));
    }
    e.record_lease(&lease.token, now);
    let record = e.lease.as_mut().expect("recorded just above");
    record.extended = record
        .extended
        .checked_add(by.as_secs())
        .filter(|total| *total <= TimeLimit::MAX.as_secs())
        .ok_or_else(|| {
            MasterError::BadInput(format!(
                "a lease can be extended by at most {} in all",
                TimeLimit::MAX
            ))
        })?;
    lease.deadline = e.deadline(&lease.token, now);
    lease.attempt = e.attempts.saturating_add(1);
    write_job_list(fs, &list)?;
    Ok(lease)
}
