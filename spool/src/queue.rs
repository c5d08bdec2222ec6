//! `jobs.toml`: the job list in the order agents take jobs. Only the master
//! writes it; agents read it to find work.

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::time::Timestamp;
use crate::units::TimeLimit;

use crate::error::{IoContext, Result, SpoolError};
use crate::spool::{SpoolFs, JOB_LIST};

/// The state a job list entry records. `leased` and `uploading` are not
/// stored: they follow from the lease and status files (see [`crate::master::JobState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    Queued,
    Failed,
    Invalid,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub priority: u32,
    /// Submission order; breaks priority ties (earlier first).
    pub seq: u64,
    pub state: EntryState,
    /// Attempts used so far (leases that expired, failed or were refused).
    #[serde(default)]
    pub attempts: u32,
    pub max_attempts: u32,
    pub time_limit: TimeLimit,
    pub submitted: Timestamp,
    /// BLAKE3 of the job file as submitted.
    #[serde(default)]
    pub blake3: String,
    /// Why the job is where it is (the last failure, the validation error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The lease the master has seen on this job, by the master's own clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRecord>,
}

/// What the master knows of a job's lease from its own records: the agent's
/// lease file says when it claimed the job and until when, but an agent is
/// trusted for neither. The master counts from when it first saw the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub token: String,
    /// When the master first saw this lease.
    pub seen: Timestamp,
    /// Seconds the operator added with `extend`, at most [`TimeLimit::MAX`] in all.
    #[serde(default)]
    pub extended: u64,
}

impl Entry {
    /// A queued entry for a job file whose payloads are pinned (`pinned` is
    /// the file's text as stored in `jobs/`); `push` gives it its number.
    pub fn queued(spec: &JobSpec, pinned: &str, now: Timestamp) -> Entry {
        Entry {
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
            lease: None,
        }
    }

    /// The deadline of the lease with `token` by the master's records: when
    /// the master first saw it plus the job's time limit and any extension.
    /// A lease the master has not recorded yet counts from `now`.
    pub fn deadline(&self, token: &str, now: Timestamp) -> Timestamp {
        let (seen, extended) = match &self.lease {
            Some(r) if r.token == token => (r.seen, r.extended.min(TimeLimit::MAX.as_secs())),
            _ => (now, 0),
        };
        seen.plus(self.time_limit.as_duration())
            .plus(std::time::Duration::from_secs(extended))
    }

    /// Records `token` as the job's lease, first seen `now`, unless it is
    /// already the recorded one. Returns true if the entry changed.
    pub fn record_lease(&mut self, token: &str, now: Timestamp) -> bool {
        if self.lease.as_ref().is_some_and(|r| r.token == token) {
            return false;
        }
        self.lease = Some(LeaseRecord {
            token: token.to_string(),
            seen: now,
            extended: 0,
        });
        true
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobList {
    #[serde(default)]
    pub next_seq: u64,
    #[serde(default, rename = "job")]
    pub jobs: Vec<Entry>,
}

impl JobList {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        let mut list: JobList = toml::from_str(text)?;
        list.sort();
        Ok(list)
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# The job list, in the order agents take jobs. Written by kiln-master;\n# edit it with kiln-master, not by hand.\n\n",
        );
        out.push_str(&toml::to_string(self).expect("a job list always serializes"));
        out
    }

    /// Priority order: higher priority first, then earlier submission.
    pub fn sort(&mut self) {
        self.jobs
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.jobs.iter().find(|e| e.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.jobs.iter_mut().find(|e| e.id == id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        let i = self.jobs.iter().position(|e| e.id == id)?;
        Some(self.jobs.remove(i))
    }

    /// Adds an entry with the next submission number and keeps the order.
    pub fn push(&mut self, mut entry: Entry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.push(entry);
        self.sort();
    }

    /// Moves a job one place up or down among the queued jobs by taking the
    /// priority of its neighbour (and reordering ties by submission).
    /// Returns the new priority, or `None` if it is already at that end.
    pub fn shift(&mut self, id: &str, up: bool) -> Option<u32> {
        let queued: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].state == EntryState::Queued)
            .collect();
        let pos = queued.iter().position(|&i| self.jobs[i].id == id)?;
        let other = if up {
            pos.checked_sub(1)?
        } else if pos + 1 < queued.len() {
            pos + 1
        } else {
            return None;
        };
        // Trading both priority and submission number swaps the two places,
        // whether or not their priorities were tied.
        let (a, b) = (queued[pos], queued[other]);
        let (pa, sa) = (self.jobs[a].priority, self.jobs[a].seq);
        self.jobs[a].priority = self.jobs[b].priority;
        self.jobs[a].seq = self.jobs[b].seq;
        self.jobs[b].priority = pa;
        self.jobs[b].seq = sa;
        self.sort();
        self.get(id).map(|e| e.priority)
    }
}

/// Reads `jobs.toml`; an absent list is an empty one.
pub fn read_job_list(fs: &dyn SpoolFs) -> Result<JobList> {
    let Some(bytes) = fs
        .read_opt(JOB_LIST)
        .ctx(|| format!("reading {JOB_LIST}"))?
    else {
        return Ok(JobList::default());
    };
    let text = String::from_utf8_lossy(&bytes);
    JobList::parse(&text).map_err(|e| SpoolError::Corrupt {
        path: JOB_LIST.into(),
        problem: e.to_string(),
    })
}
