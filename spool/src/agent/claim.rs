//! The agent's side of the spool rules: find work, claim it, keep the claim.

use crate::error::{IoContext, Result, SpoolError};
use crate::lease::{read_lease, Lease};
use crate::queue::{read_job_list, Entry, EntryState};
use crate::spool::{job_path, lease_path, status_path, SpoolFs, JOB_LIST, LEASES};
use crate::status::Status;
use crate::time::Timestamp;

/// Queued jobs that nobody holds, in the order agents take them.
pub fn available_jobs(fs: &dyn SpoolFs) -> Result<Vec<Entry>> {
    let list = read_job_list(fs)?;
    let leased: std::collections::HashSet<String> = fs
        .list(LEASES)
        .ctx(|| format!("listing {LEASES}/"))?
        .into_iter()
        .collect();
    Ok(list
        .jobs
        .into_iter()
        .filter(|e| e.state == EntryState::Queued && e.attempts < e.max_attempts)
        .filter(|e| !leased.contains(&e.id))
        .collect())
}

/// Claims the highest-priority job nobody holds. Walks the available jobs in
/// order and tries an exclusive create of each one's lease; losing a race
/// moves on to the next. `None` when nothing is left.
pub fn claim_next(fs: &dyn SpoolFs, agent: &str, now: Timestamp) -> Result<Option<Lease>> {
    for entry in available_jobs(fs)? {
        let lease = Lease::new(&entry.id, agent, now, entry.time_limit, entry.attempts + 1);
        let path = lease_path(&entry.id);
        if !fs
            .create_exclusive(&path, lease.to_toml().as_bytes())
            .ctx(|| format!("creating {path}"))?
        {
            continue;
        }
        // The job list read above may be stale: the master may have
        // published or cancelled the job and removed its lease since. The
        // master rewrites the list before it removes a lease, so a fresh
        // read tells; a claim on a job no longer queued is withdrawn.
        let still_queued = read_job_list(fs)?
            .get(&entry.id)
            .is_some_and(|e| e.state == EntryState::Queued);
        if still_queued {
            return Ok(Some(lease));
        }
        if check_lease(fs, &lease)? == LeaseCheck::Held {
            fs.remove(&path).ctx(|| format!("withdrawing {path}"))?;
        }
    }
    Ok(None)
}

/// The BLAKE3 that the job list pins for job `id`'s file.
pub fn pinned_job_hash(fs: &dyn SpoolFs, id: &str) -> Result<String> {
    read_job_list(fs)?
        .get(id)
        .map(|e| e.blake3.clone())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| SpoolError::Corrupt {
            path: JOB_LIST.into(),
            problem: format!("pins no BLAKE3 for job {id:?}"),
        })
}

/// Reads the job file of a held lease and checks it against the BLAKE3
/// that the job list pins, before anything is done with it: the job file
/// says what runs as root on the build machine.
pub fn fetch_job(fs: &dyn SpoolFs, lease: &Lease) -> Result<String> {
    let pinned = pinned_job_hash(fs, &lease.job)?;
    let path = job_path(&lease.job);
    let bytes = fs
        .read_capped(&path, crate::job::MAX_JOB_BYTES as u64)
        .ctx(|| format!("reading {path}"))?
        .ok_or_else(|| SpoolError::Corrupt {
            path: path.clone(),
            problem: "is missing".into(),
        })?;
    let got = blake3::hash(&bytes).to_hex();
    if got.as_str() != pinned {
        return Err(SpoolError::Corrupt {
            path,
            problem: format!("has BLAKE3 {got}, but {JOB_LIST} pins {pinned}"),
        });
    }
    String::from_utf8(bytes).map_err(|_| SpoolError::Corrupt {
        path,
        problem: "is not UTF-8".into(),
    })
}

/// What a holder finds when it looks at its lease again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseCheck {
    Held,
    /// Reaped, cancelled or published: nothing is there.
    Gone,
    /// Someone else holds the job now.
    Replaced {
        by_agent: String,
    },
}

/// Checks that `lease` is still the job's lease. A holder that gets anything
/// but `Held` must stop the job at once.
pub fn check_lease(fs: &dyn SpoolFs, lease: &Lease) -> Result<LeaseCheck> {
    Ok(match read_lease(fs, &lease.job)? {
        None => LeaseCheck::Gone,
        Some(l) if l.token == lease.token => LeaseCheck::Held,
        Some(l) => LeaseCheck::Replaced { by_agent: l.agent },
    })
}

/// Writes the holder's heartbeat after checking the lease is still its own.
pub fn heartbeat(fs: &dyn SpoolFs, lease: &Lease, status: &Status) -> Result<LeaseCheck> {
    let check = check_lease(fs, lease)?;
    if check == LeaseCheck::Held {
        let path = status_path(&lease.job);
        fs.write_atomic(&path, status.to_toml().as_bytes())
            .ctx(|| format!("writing {path}"))?;
    }
    Ok(check)
}
