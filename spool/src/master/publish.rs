//! Publishing: a complete upload whose token is the job's current lease is
//! verified chunk by chunk and copied into a temporary directory under
//! `images/` ([`stage`], without the masters' lock), then renamed whole into
//! `images/<id>/` and recorded ([`commit`], under it). `images/` is the
//! master's alone, so `images/<id>/published.toml` is the publication's
//! record: a master stopped anywhere after the rename finishes the job on
//! its next pass ([`finish_published`]), whatever happened to the lease.
//!
//! The published `manifest.toml` is the agent's, checked field by field,
//! with the provenance only the master can vouch for filled in (the job
//! file's text, the publication's time, the master's version and key), and
//! `manifest.toml.sig` is the master's SSH signature of exactly those bytes.
//! Both are written in the staging directory, so a publication is never
//! visible unsigned.

use std::io::{Read, Write};

use crate::stream::{HashReader, HashWriter, Limit};

use crate::error::IoContext;
use crate::job::{parse_job, MAX_JOB_BYTES};
use crate::lease::Lease;
use crate::manifest::{ImageManifest, Provenance};
use crate::master::reaper::{release, tidy, ReapReport};
use crate::master::{write_job_list, HistoryRecord, Result};
use crate::queue::{EntryState, JobList};
use crate::signature::SigningKey;
use crate::spool::{
    history_path, image_dir, incoming_dir, job_path, lease_path, status_path, SpoolFs, IMAGES,
    INCOMING, TMP_PREFIX,
};
use crate::time::Timestamp;
use crate::untrusted::{self, MAX_JOB_LOG};
use crate::upload::{
    chunk_name, Published, CHUNKS, IMAGE_FILE, JOB_LOG, MANIFEST, PUBLISHED, SIGNATURE,
};

/// An upload verified and copied into `images/`, not yet visible.
pub struct Staged {
    tmp: String,
}

fn staging_dir(lease: &Lease) -> String {
    format!("{IMAGES}/{TMP_PREFIX}{}.{}", lease.job, lease.token)
}

/// Verifies the upload of `lease` and copies it into a staging directory
/// under `images/`: every chunk's BLAKE3 and size against the chunk list,
/// the whole image's against the manifest, the manifest's job hash against
/// `job_blake3` (the master's pin). What is copied is what was hashed, so an
/// agent that rewrites its chunks meanwhile gains nothing. The manifest is
/// completed with the master's provenance and signed with `key`. `Err` says
/// why the upload is refused.
pub fn stage(
    fs: &dyn SpoolFs,
    lease: &Lease,
    job_blake3: &str,
    key: &SigningKey,
    now: Timestamp,
) -> std::result::Result<Staged, String> {
    let dir = incoming_dir(&lease.job, &lease.token);
    let records = untrusted::upload_records(fs, &dir, &lease.job).map_err(|e| e.to_string())?;
    let (chunks, manifest) = (&records.chunks, &records.manifest);
    if manifest.job_blake3 != job_blake3 {
        return Err(format!(
            "{MANIFEST} is for the job file with BLAKE3 {:?}, the job list pins {job_blake3}",
            manifest.job_blake3.escape_debug().to_string()
        ));
    }
    let signed = signed_manifest(fs, manifest, job_blake3, key, now)?;

    let tmp = staging_dir(lease);
    let io = |what: String| move |e: std::io::Error| format!("{what}: {e}");
    fs.remove_dir_all(&tmp)
        .map_err(io(format!("removing {tmp}")))?;
    fs.mkdir_all(&tmp).map_err(io(format!("creating {tmp}")))?;
    let result = (|| {
        let image_path = format!("{tmp}/{IMAGE_FILE}");
        let out = fs
            .create_write(&image_path)
            .map_err(io(format!("creating {image_path}")))?;
        // One pass over the chunks: each is hashed on its own and, through
        // the outer hasher, as part of the whole image.
        let mut whole = HashWriter::new(out);
        for (i, c) in chunks.chunks.iter().enumerate() {
            let path = format!("{dir}/{}", chunk_name(i));
            let r = fs.open_read(&path).map_err(|e| format!("chunk {i}: {e}"))?;
            // Never more than the chunk list says: a chunk that keeps
            // growing is refused, not copied.
            let mut chunk = HashReader::new(Limit::new(r, c.size, format!("chunk {i}")));
            std::io::copy(&mut chunk, &mut whole).map_err(io(format!("copying {path}")))?;
            let got = chunk.digest();
            if got.size != c.size {
                return Err(format!(
                    "chunk {i} holds {} bytes, {CHUNKS} says {}",
                    got.size, c.size
                ));
            }
            if got.blake3 != c.blake3 {
                return Err(format!(
                    "chunk {i} has BLAKE3 {}, {CHUNKS} says {}",
                    got.blake3,
                    c.blake3.escape_debug()
                ));
            }
        }
        whole.flush().map_err(io(format!("writing {image_path}")))?;
        let got = whole.digest().blake3;
        drop(whole);
        if got != manifest.image_blake3 {
            return Err(format!(
                "the image has BLAKE3 {got}, {MANIFEST} says {}",
                manifest.image_blake3.escape_debug()
            ));
        }
        fs.write_atomic(&format!("{tmp}/{MANIFEST}"), signed.text.as_bytes())
            .map_err(io(format!("writing {tmp}/{MANIFEST}")))?;
        fs.write_atomic(&format!("{tmp}/{SIGNATURE}"), signed.signature.as_bytes())
            .map_err(io(format!("writing {tmp}/{SIGNATURE}")))?;
        copy_job_log(fs, &dir, &tmp);
        let published = Published {
            job: lease.job.clone(),
            token: lease.token.clone(),
            agent: lease.agent.clone(),
            published: now,
            image_size: manifest.image_size,
            image_blake3: manifest.image_blake3.clone(),
            disk_size: manifest.disk_size,
        };
        fs.write_atomic(
            &format!("{tmp}/{PUBLISHED}"),
            published.to_toml().as_bytes(),
        )
        .map_err(io(format!("writing {tmp}/{PUBLISHED}")))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs.remove_dir_all(&tmp);
    }
    result.map(|()| Staged { tmp })
}

/// A manifest ready to publish: its text and the master's signature of it.
struct SignedManifest {
    text: String,
    signature: String,
}

/// The agent's manifest with the master's provenance: the job file's text
/// (read from `jobs/<id>.toml`, which must still hash to the pin), the
/// time, the master's version and the signing key's fingerprint. Whatever
/// the agent wrote in those fields is replaced. Each payload the agent
/// lists must be one the job pins, with the pinned hash.
fn signed_manifest(
    fs: &dyn SpoolFs,
    agents: &ImageManifest,
    job_blake3: &str,
    key: &SigningKey,
    now: Timestamp,
) -> std::result::Result<SignedManifest, String> {
    let path = job_path(&agents.job);
    let bytes = fs
        .read_capped(&path, MAX_JOB_BYTES as u64)
        .map_err(|e| format!("reading {path}: {e}"))?
        .ok_or_else(|| format!("{path} is missing"))?;
    let got = blake3::hash(&bytes).to_hex().to_string();
    if got != job_blake3 {
        return Err(format!(
            "{path} has BLAKE3 {got}, the job list pins {job_blake3}"
        ));
    }
    let job_text = String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8"))?;
    if let Ok(spec) = parse_job(&job_text) {
        for (i, p) in agents.payloads.iter().enumerate() {
            let pinned = spec
                .payloads
                .iter()
                .any(|q| q.name == p.name && q.blake3.as_deref().unwrap_or("") == p.blake3);
            if !pinned {
                return Err(format!(
                    "{MANIFEST}: payloads[{i}] {:?} with BLAKE3 {:?} is not a payload {path} pins",
                    p.name.escape_debug().to_string(),
                    p.blake3.escape_debug().to_string()
                ));
            }
        }
    }
    let mut manifest = agents.clone();
    let mut provenance = manifest.provenance.take().unwrap_or_default();
    let claimed = Provenance {
        kiln_version: provenance.kiln_version.clone(),
        hardware: provenance.hardware.clone(),
        ..Provenance::default()
    };
    if claimed != provenance {
        tracing::warn!(
            "{}: the agent set provenance fields only the master sets; they are replaced",
            agents.job
        );
    }
    provenance.job_text = job_text;
    provenance.published = Some(now);
    provenance.publisher_version = env!("CARGO_PKG_VERSION").to_string();
    provenance.signer = key.fingerprint();
    manifest.provenance = Some(provenance);
    let text = manifest.to_toml();
    let signature = key
        .sign(text.as_bytes())
        .map_err(|e| format!("signing {MANIFEST}: {e}"))?;
    Ok(SignedManifest { text, signature })
}

/// Keeps the agent's job log with the image, cut at [`MAX_JOB_LOG`]; a log
/// that is missing or not a regular file is left behind.
fn copy_job_log(fs: &dyn SpoolFs, from: &str, to: &str) {
    let src = format!("{from}/{JOB_LOG}");
    let Ok(r) = fs.open_read(&src) else {
        return;
    };
    let dst = format!("{to}/{JOB_LOG}");
    let copied = fs.create_write(&dst).and_then(|mut w| {
        std::io::copy(&mut r.take(MAX_JOB_LOG), &mut w)?;
        w.flush()
    });
    if let Err(e) = copied {
        tracing::warn!("keeping {src}: {e}");
        let _ = fs.remove(&dst);
    }
}

/// Makes a staged upload the job's image if its lease is still the job's
/// current one, and records the job as done; refuses the upload (and ends
/// the lease) if staging failed. Runs under the masters' lock.
pub fn commit(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    lease: &Lease,
    outcome: std::result::Result<Staged, String>,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<()> {
    let id = &lease.job;
    // The lease may have been reaped, cancelled or replaced while the
    // upload was verified without the lock.
    let current = untrusted::lease(fs, id)
        .ok()
        .flatten()
        .is_some_and(|l| l.token == lease.token)
        && list.get(id).is_some_and(|e| e.state == EntryState::Queued);
    match outcome {
        Ok(staged) if current => {
            let final_dir = image_dir(id);
            if let Err(e) = fs.rename_noclobber(&staged.tmp, &final_dir) {
                let _ = fs.remove_dir_all(&staged.tmp);
                let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    format!("{final_dir} already holds an image")
                } else {
                    format!("renaming {} to {final_dir}: {e}", staged.tmp)
                };
                return refuse(fs, list, lease, why, report);
            }
            finish_published(fs, list, now, report)?;
        }
        Ok(staged) => {
            let _ = fs.remove_dir_all(&staged.tmp);
        }
        Err(why) if current => refuse(fs, list, lease, why, report)?,
        Err(_) => {}
    }
    Ok(())
}

pub(crate) fn refuse(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    lease: &Lease,
    why: String,
    report: &mut ReapReport,
) -> Result<()> {
    let why = format!("upload refused: {why}");
    let state = release(fs, list, lease, &why)?;
    report.refused.push((
        lease.job.clone(),
        lease.token.clone(),
        why.trim_start_matches("upload refused: ").to_string(),
    ));
    report.released.push((lease.job.clone(), state, why));
    Ok(())
}

/// Finishes every job of the list that already has a published image: the
/// rename into `images/<id>/` is the publication, and what follows (the
/// history record, the job list, removing the lease, heartbeat and upload)
/// is done again until it is complete. Returns true if the list changed
/// (it is then written already).
pub fn finish_published(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<bool> {
    let mut done = Vec::new();
    for e in &list.jobs {
        let path = format!("{}/{PUBLISHED}", image_dir(&e.id));
        if let Some(bytes) = fs.read_opt(&path).ctx(|| format!("reading {path}"))? {
            match Published::parse(&String::from_utf8_lossy(&bytes)) {
                Ok(p) => done.push(p),
                Err(err) => report.set_aside.push((path, err.to_string())),
            }
        }
    }
    let changed = !done.is_empty();
    for p in done {
        finish(fs, list, &p, now)?;
        report.published.push(p.job);
    }
    Ok(changed)
}

/// Records a published job in `history/` and drops it from the job list,
/// then removes its lease, heartbeat and uploads.
fn finish(fs: &dyn SpoolFs, list: &mut JobList, p: &Published, now: Timestamp) -> Result<()> {
    let id = &p.job;
    let Some(mut entry) = list.remove(id) else {
        return Ok(());
    };
    let status = untrusted::status(fs, id)
        .ok()
        .flatten()
        .filter(|s| s.token == p.token);
    // The attempt that succeeded counts.
    entry.attempts = entry.attempts.saturating_add(1);
    entry.lease = None;
    entry.message = format!("published at {}", p.published);
    let record = HistoryRecord {
        entry,
        finished: now,
        agent: p.agent.clone(),
        token: p.token.clone(),
        status,
        deployment: None,
    };
    let path = history_path(id);
    fs.write_atomic(&path, record.to_toml().as_bytes())
        .ctx(|| format!("writing {path}"))?;
    write_job_list(fs, list)?;
    for p in [lease_path(id), status_path(id), format!("{INCOMING}/{id}")] {
        tidy(fs, &p);
    }
    Ok(())
}
