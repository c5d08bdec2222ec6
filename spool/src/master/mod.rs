//! The master's side of the spool rules: the operator's actions on the job
//! list ([`operator`]), the job views that `list`, `show` and the TUI present
//! ([`views`]), and the periodic pass that reaps leases and publishes
//! uploads ([`reaper`], [`publish`]) or records deploys ([`deploy`]), with
//! the image signing key ([`signing`]) and what `show` and `verify` read of
//! a publication ([`provenance`]). Callers on a local spool hold
//! [`crate::LocalSpool::lock`] around every change.

pub mod deploy;
pub mod operator;
pub mod provenance;
pub mod publish;
pub mod reaper;
pub mod signing;
pub mod views;

pub use operator::*;
pub use reaper::{reap, reap_locking, release, ReapReport};
pub use views::*;

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, SpoolError};
use crate::job::JobError;
use crate::queue::{Entry, JobList};
use crate::spool::{SpoolFs, DIRS, JOB_LIST};
use crate::status::Status;
use crate::time::Timestamp;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Untrusted(#[from] crate::untrusted::Untrusted),
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
    /// The master's signing key is unreadable or damaged.
    #[error("{0}")]
    SigningKey(String),
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
    /// For a deploy job: the agent's report of what it wrote where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<crate::upload::DeployReport>,
}

impl HistoryRecord {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a history record always serializes")
    }
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
