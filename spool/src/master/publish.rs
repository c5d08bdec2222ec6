//! Publishing: a complete upload whose token is the job's current lease is
//! verified chunk by chunk and moved whole into `images/<id>/`.

use std::io::{Read, Write};

use crate::error::{IoContext, SpoolError};
use crate::lease::{check_token, read_lease, Lease};
use crate::manifest::ImageManifest;
use crate::master::reaper::{release, ReapReport};
use crate::master::{write_job_list, HistoryRecord, MasterError, Result};
use crate::names::check_job_id;
use crate::queue::{Entry, EntryState, JobList};
use crate::spool::{
    history_path, image_dir, incoming_dir, lease_path, status_path, SpoolFs, IMAGES, INCOMING,
    TMP_PREFIX,
};
use crate::status::read_status;
use crate::time::Timestamp;
use crate::units::TimeLimit;
use crate::upload::{
    chunk_name, ChunkList, Published, CHUNKS, IMAGE_FILE, JOB_LOG, MANIFEST, PUBLISHED,
};

pub(crate) fn publish_uploads(
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
            time_limit: TimeLimit::MIN,
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
