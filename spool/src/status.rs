//! The heartbeat an agent writes for the job it holds: `status/<id>.toml`.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

use crate::error::{IoContext, Result, SpoolError};
use crate::spool::{status_path, SpoolFs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Claimed and working through the build phases.
    Building,
    /// Sending the image.
    Uploading,
    /// The upload is complete; waiting for the master to publish it.
    Uploaded,
    /// The agent gave up on the job; `message` says why.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub job: String,
    pub agent: String,
    pub token: String,
    /// The job server the agent reached this spool as (`host:port`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server: String,
    pub state: AgentState,
    /// The build phase: check, download, partition, mkfs, mount, payloads,
    /// configure, steps, capture, upload.
    pub phase: String,
    /// Progress through the phase, 0.0 to 1.0.
    #[serde(default)]
    pub progress: f32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub started: Timestamp,
    pub updated: Timestamp,
}

impl Status {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a status always serializes")
    }
}

/// Reads a job's heartbeat, `None` if it has none.
pub fn read_status(fs: &dyn SpoolFs, id: &str) -> Result<Option<Status>> {
    let path = status_path(id);
    let Some(bytes) = fs.read_opt(&path).ctx(|| format!("reading {path}"))? else {
        return Ok(None);
    };
    Status::parse(&String::from_utf8_lossy(&bytes))
        .map(Some)
        .map_err(|e| SpoolError::Corrupt {
            path,
            problem: e.to_string(),
        })
}
