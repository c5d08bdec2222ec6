//! Deploy jobs on the master: a `kind = "deploy"` job is queued only if the
//! image it names is published, and is pinned to that publication's
//! manifest ([`pin_deploy`]); an agent that has written the image leaves
//! `deployed.toml` in its upload directory, and the pass records the job as
//! done with that report ([`finish_deploys`]). History then says which
//! machine got which image ([`deployments_of`]).

use crate::error::IoContext;
use crate::job::{parse_job, Deploy, JobError, JobKind};
use crate::lease::Lease;
use crate::master::publish::refuse;
use crate::master::reaper::{tidy, ReapReport};
use crate::master::{read_history, write_job_list, HistoryRecord, Result};
use crate::queue::{EntryState, JobList};
use crate::spool::{
    history_path, image_dir, incoming_dir, job_path, lease_path, status_path, SpoolFs, INCOMING,
};
use crate::time::Timestamp;
use crate::untrusted::{self, Untrusted};
use crate::upload::{DEPLOYED, MANIFEST, PUBLISHED};

/// BLAKE3 of `images/<id>/manifest.toml`, the publication a deploy job
/// pins; `Err` names the file that shows the image is not published.
pub fn published_manifest_blake3(fs: &dyn SpoolFs, id: &str) -> Result<String, String> {
    let dir = image_dir(id);
    let published = format!("{dir}/{PUBLISHED}");
    if !fs
        .exists(&published)
        .map_err(|e| format!("reading {published}: {e}"))?
    {
        return Err(format!(
            "{id:?} is not a published image: there is no {published}"
        ));
    }
    let path = format!("{dir}/{MANIFEST}");
    let bytes = fs
        .read_capped(&path, untrusted::MAX_UPLOAD_RECORD)
        .map_err(|e| format!("reading {path}: {e}"))?
        .ok_or_else(|| format!("{path} is missing"))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Checks that the image a deploy job names is published and pins its
/// manifest's BLAKE3 into `doc` (`[deploy] manifest_blake3`), or checks
/// the one the job gives.
pub fn pin_deploy(
    fs: &dyn SpoolFs,
    doc: &mut toml_edit::DocumentMut,
    deploy: &Deploy,
) -> Result<(), JobError> {
    let actual = published_manifest_blake3(fs, &deploy.image).map_err(|problem| JobError {
        file: None,
        field: "deploy.image".into(),
        problem,
    })?;
    match &deploy.manifest_blake3 {
        Some(given) if *given != actual => Err(JobError {
            file: None,
            field: "deploy.manifest_blake3".into(),
            problem: format!(
                "{given} does not match {}/{MANIFEST}, whose BLAKE3 is {actual}",
                image_dir(&deploy.image)
            ),
        }),
        Some(_) => Ok(()),
        None => {
            let table = doc["deploy"].as_table_like_mut().ok_or_else(|| JobError {
                file: None,
                field: "deploy".into(),
                problem: "must be a table".into(),
            })?;
            table.insert("manifest_blake3", toml_edit::value(actual));
            Ok(())
        }
    }
}

/// Finishes every deploy job whose current lease's upload directory holds
/// a `deployed.toml`: a report that checks out makes the job done, one
/// that does not ends the lease. Runs under the masters' lock.
pub fn finish_deploys(
    fs: &dyn SpoolFs,
    list: &mut JobList,
    now: Timestamp,
    report: &mut ReapReport,
) -> Result<()> {
    let held: Vec<Lease> = list
        .jobs
        .iter()
        .filter(|e| e.state == EntryState::Queued && e.lease.is_some())
        .filter_map(|e| untrusted::lease(fs, &e.id).ok().flatten())
        .collect();
    for lease in held {
        let dir = incoming_dir(&lease.job, &lease.token);
        let path = format!("{dir}/{DEPLOYED}");
        if !fs.exists(&path).unwrap_or(false) {
            continue;
        }
        let deploy = match deploy_spec(fs, &lease.job) {
            Ok(d) => d,
            Err(why) => {
                refuse(fs, list, &lease, why, report)?;
                continue;
            }
        };
        let pin = deploy.manifest_blake3.clone().unwrap_or_default();
        let r = match untrusted::deploy_report(fs, &dir, &lease.job, &deploy.image) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(Untrusted::Io { what, source }) => {
                report.set_aside.push((path, format!("{what}: {source}")));
                continue;
            }
            Err(bad) => {
                refuse(fs, list, &lease, bad.to_string(), report)?;
                continue;
            }
        };
        if r.manifest_blake3 != pin {
            let why = format!(
                "{path}: manifest_blake3 {} is not the publication the job pins ({pin})",
                r.manifest_blake3
            );
            refuse(fs, list, &lease, why, report)?;
            continue;
        }
        let Some(mut entry) = list.remove(&lease.job) else {
            continue;
        };
        let status = untrusted::status_of(fs, &lease);
        entry.attempts = entry.attempts.saturating_add(1);
        entry.lease = None;
        entry.message = format!("deployed {} onto {} at {}", r.image, r.agent, r.finished);
        let id = lease.job.clone();
        report
            .deployed
            .push((id.clone(), r.image.clone(), r.agent.clone()));
        let record = HistoryRecord {
            entry,
            finished: now,
            agent: lease.agent.clone(),
            token: lease.token.clone(),
            status,
            deployment: Some(r),
        };
        let hist = history_path(&id);
        fs.write_atomic(&hist, record.to_toml().as_bytes())
            .ctx(|| format!("writing {hist}"))?;
        write_job_list(fs, list)?;
        for p in [
            lease_path(&id),
            status_path(&id),
            format!("{INCOMING}/{id}"),
        ] {
            tidy(fs, &p);
        }
    }
    Ok(())
}

/// The `[deploy]` table of a job the master holds, or why there is none.
fn deploy_spec(fs: &dyn SpoolFs, id: &str) -> Result<Deploy, String> {
    let path = job_path(id);
    let bytes = fs
        .read_capped(&path, crate::job::MAX_JOB_BYTES as u64)
        .map_err(|e| format!("reading {path}: {e}"))?
        .ok_or_else(|| format!("{path} is missing"))?;
    let spec = parse_job(&String::from_utf8_lossy(&bytes)).map_err(|e| format!("{path}: {e}"))?;
    match (spec.kind, spec.deploy) {
        (JobKind::Deploy, Some(d)) => Ok(d),
        _ => Err(format!(
            "{DEPLOYED} in the upload of {path}, which is not a deploy job"
        )),
    }
}

/// The finished deploy jobs that wrote image `id`, oldest first.
pub fn deployments_of(fs: &dyn SpoolFs, id: &str) -> Result<Vec<HistoryRecord>> {
    Ok(read_history(fs)?
        .into_iter()
        .filter(|h| h.deployment.as_ref().is_some_and(|d| d.image == id))
        .collect())
}
