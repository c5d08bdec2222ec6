//! The master's periodic pass: take in job files dropped into `jobs/`, end
//! leases that ran past their deadline or whose agent gave up, and publish
//! complete uploads whose token is still the job's lease.

use std::io::{Read, Write};
use std::path::Path;

use crate::claim::{read_job_list, read_lease, read_status, IoContext, SpoolError};
use crate::job::parse_job;
use crate::lease::{check_token, Lease};
use crate::manifest::ImageManifest;
use crate::master::{pin_payloads, write_job_list, HistoryRecord, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{Entry, EntryState, JobList};
use crate::spool::{
    history_path, image_dir, incoming_dir, job_path, lease_path, status_path, SpoolFs, HISTORY,
    IMAGES, INCOMING, JOBS, LEASES, TMP_PREFIX,
};
use crate::status::AgentState;
use crate::time::Timestamp;
use crate::units::Span;
use crate::upload::{
    chunk_name, ChunkList, Published, CHUNKS, IMAGE_FILE, JOB_LOG, MANIFEST, PUBLISHED,
};

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
            time_limit: Span::from_secs(3600),
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

fn publish_uploads(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<()> {
    for id in fs.list(INCOMING).ctx(|| format!("listing {INCOMING}/"))? {
        if check_job_id(&id).is_err() {
            continue;
        }
        // An unreadable lease must not count as no lease: that would delete
        // the holder's upload. A corrupt one is cleared by the next pass.
        let lease = match read_lease(fs, &id) {
            Ok(l) => l,
            Err(SpoolError::Corrupt { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for token in fs
            .list(&format!("{INCOMING}/{id}"))
            .ctx(|| format!("listing {INCOMING}/{id}/"))?
        {
            let dir = incoming_dir(&id, &token);
            let current = lease
                .as_ref()
                .filter(|l| l.token == token && check_token(&token).is_ok());
            let complete = fs
                .exists(&format!("{dir}/{MANIFEST}"))
                .ctx(|| format!("reading {dir}"))?;
            match (current, complete) {
                (Some(lease), true) => match publish(fs, lease, now) {
                    Ok(record) => {
                        finish(fs, list, record)?;
                        report.published.push(id.clone());
                    }
                    Err(Refusal(why)) => {
                        let state = release(fs, list, lease, &format!("upload refused: {why}"))?;
                        report
                            .refused
                            .push((id.clone(), token.clone(), why.clone()));
                        report
                            .released
                            .push((id.clone(), state, format!("upload refused: {why}")));
                    }
                },
                (Some(_), false) => {}
                (None, complete) => {
                    // Not the job's lease: a holder that was reaped, or a
                    // stray directory. It can never be published.
                    fs.remove_dir_all(&dir).ctx(|| format!("removing {dir}"))?;
                    if complete {
                        report.refused.push((
                            id.clone(),
                            token.clone(),
                            "its token is not the job's current lease".into(),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Why an upload is not published.
struct Refusal(String);

impl From<MasterError> for Refusal {
    fn from(e: MasterError) -> Self {
        Refusal(e.to_string())
    }
}

impl From<SpoolError> for Refusal {
    fn from(e: SpoolError) -> Self {
        Refusal(e.to_string())
    }
}

fn read_text(fs: &dyn SpoolFs, path: &str) -> std::result::Result<String, Refusal> {
    let bytes = fs
        .read_opt(path)
        .ctx(|| format!("reading {path}"))?
        .ok_or_else(|| Refusal(format!("{path} is missing")))?;
    String::from_utf8(bytes).map_err(|_| Refusal(format!("{path} is not UTF-8")))
}

/// Verifies an upload and moves it into `images/<job>/`; the final name
/// appears only once the image is complete.
fn publish(
    fs: &dyn SpoolFs,
    lease: &Lease,
    now: Timestamp,
) -> std::result::Result<HistoryRecord, Refusal> {
    let dir = incoming_dir(&lease.job, &lease.token);
    let final_dir = image_dir(&lease.job);
    let published_path = format!("{final_dir}/{PUBLISHED}");
    // A pass that stopped after the rename but before the bookkeeping
    // finishes the job now rather than refusing the upload.
    if let Some(bytes) = fs
        .read_opt(&published_path)
        .ctx(|| format!("reading {published_path}"))?
    {
        let p: Published = toml::from_str(&String::from_utf8_lossy(&bytes))
            .map_err(|e| Refusal(format!("{published_path}: {e}")))?;
        if p.token == lease.token {
            return Ok(history(fs, lease, now));
        }
        return Err(Refusal(format!(
            "{final_dir} already holds an image from another lease"
        )));
    }

    let chunks_text = read_text(fs, &format!("{dir}/{CHUNKS}"))?;
    let chunks = ChunkList::parse(&chunks_text).map_err(|e| Refusal(format!("{CHUNKS}: {e}")))?;
    chunks
        .check_shape()
        .map_err(|e| Refusal(format!("{CHUNKS}: {e}")))?;
    let manifest_text = read_text(fs, &format!("{dir}/{MANIFEST}"))?;
    let manifest =
        ImageManifest::parse(&manifest_text).map_err(|e| Refusal(format!("{MANIFEST}: {e}")))?;
    if manifest.job != lease.job {
        return Err(Refusal(format!("{MANIFEST} is for job {:?}", manifest.job)));
    }
    if manifest.image_size != chunks.total_size {
        return Err(Refusal(format!(
            "{MANIFEST} says the image is {} bytes, the chunks hold {}",
            manifest.image_size, chunks.total_size
        )));
    }

    let tmp = format!("{IMAGES}/{TMP_PREFIX}{}.{}", lease.job, lease.token);
    fs.remove_dir_all(&tmp).ctx(|| format!("removing {tmp}"))?;
    fs.mkdir_all(&tmp).ctx(|| format!("creating {tmp}"))?;
    let result = (|| {
        let image_path = format!("{tmp}/{IMAGE_FILE}");
        let mut out = fs
            .create_write(&image_path)
            .ctx(|| format!("creating {image_path}"))?;
        let mut whole = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for (i, c) in chunks.chunks.iter().enumerate() {
            let path = format!("{dir}/{}", chunk_name(i));
            let mut r = fs
                .open_read(&path)
                .map_err(|e| Refusal(format!("chunk {i}: {e}")))?;
            let mut h = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = r.read(&mut buf).ctx(|| format!("reading {path}"))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                whole.update(&buf[..n]);
                size += n as u64;
                out.write_all(&buf[..n])
                    .ctx(|| format!("writing {image_path}"))?;
            }
            if size != c.size {
                return Err(Refusal(format!(
                    "chunk {i} holds {size} bytes, {CHUNKS} says {}",
                    c.size
                )));
            }
            let got = h.finalize().to_hex();
            if got.as_str() != c.blake3 {
                return Err(Refusal(format!(
                    "chunk {i} has BLAKE3 {got}, {CHUNKS} says {}",
                    c.blake3
                )));
            }
        }
        out.flush().ctx(|| format!("writing {image_path}"))?;
        drop(out);
        let got = whole.finalize().to_hex();
        if got.as_str() != manifest.image_blake3 {
            return Err(Refusal(format!(
                "the image has BLAKE3 {got}, {MANIFEST} says {}",
                manifest.image_blake3
            )));
        }
        fs.write_atomic(&format!("{tmp}/{MANIFEST}"), manifest_text.as_bytes())
            .ctx(|| format!("writing {tmp}"))?;
        if let Some(log) = fs
            .read_opt(&format!("{dir}/{JOB_LOG}"))
            .ctx(|| format!("reading {dir}/{JOB_LOG}"))?
        {
            fs.write_atomic(&format!("{tmp}/{JOB_LOG}"), &log)
                .ctx(|| format!("writing {tmp}/{JOB_LOG}"))?;
        }
        let published = Published {
            job: lease.job.clone(),
            token: lease.token.clone(),
            agent: lease.agent.clone(),
            published: now,
            image_size: manifest.image_size,
            image_blake3: manifest.image_blake3.clone(),
            disk_size: manifest.disk_size,
        };
        let text = toml::to_string(&published).expect("a publish record always serializes");
        fs.write_atomic(&format!("{tmp}/{PUBLISHED}"), text.as_bytes())
            .ctx(|| format!("writing {tmp}"))?;
        fs.rename_noclobber(&tmp, &final_dir)
            .ctx(|| format!("renaming {tmp} to {final_dir}"))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs.remove_dir_all(&tmp);
    }
    result?;
    Ok(history(fs, lease, now))
}

fn history(fs: &dyn SpoolFs, lease: &Lease, now: Timestamp) -> HistoryRecord {
    let status = read_status(fs, &lease.job)
        .unwrap_or(None)
        .filter(|s| s.token == lease.token);
    HistoryRecord {
        entry: Entry {
            id: lease.job.clone(),
            priority: 0,
            seq: 0,
            state: EntryState::Queued,
            attempts: lease.attempt,
            max_attempts: 0,
            time_limit: Span::from_secs(1),
            submitted: now,
            blake3: String::new(),
            message: format!("published at {now}"),
        },
        finished: now,
        agent: lease.agent.clone(),
        token: lease.token.clone(),
        status,
    }
}

/// Records a published job in `history/` and drops it from the job list.
fn finish(fs: &dyn SpoolFs, list: &mut JobList, mut record: HistoryRecord) -> Result<()> {
    let id = record.entry.id.clone();
    if let Some(e) = list.remove(&id) {
        record.entry = Entry {
            attempts: record.entry.attempts,
            message: record.entry.message,
            ..e
        };
    }
    let path = history_path(&id);
    fs.write_atomic(&path, record.to_toml().as_bytes())
        .ctx(|| format!("writing {path}"))?;
    write_job_list(fs, list)?;
    for p in [lease_path(&id), status_path(&id)] {
        fs.remove(&p).ctx(|| format!("removing {p}"))?;
    }
    let dir = format!("{INCOMING}/{id}");
    fs.remove_dir_all(&dir).ctx(|| format!("removing {dir}"))?;
    Ok(())
}
