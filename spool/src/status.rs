//! The heartbeat an agent writes for the job it holds: `status/<id>.toml`.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

use crate::error::{IoContext, Result, SpoolError};
use crate::spool::{status_path, SpoolFs};

/// The phases of a job, in order: one type for the agent's events, its
/// status file and console, the manifest's timings and the master's views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The job and the disk are checked before anything is written.
    Check,
    /// The job file from the job server.
    Download,
    Partition,
    Mkfs,
    Mount,
    /// Payloads streamed from their source into the target.
    Payloads,
    Configure,
    Steps,
    Unmount,
    Capture,
    Upload,
    /// `kiln-agent verify`, outside any job.
    Verify,
    /// A deploy writes the image's data ranges onto the disk.
    Deploy,
    /// A deploy reads every range back from the disk and checks it.
    Readback,
    /// A deploy moves the GPT's backup header and grows the last
    /// partition and its filesystem to fill a larger disk.
    Grow,
}

impl Phase {
    pub const ALL: [Phase; 15] = [
        Phase::Check,
        Phase::Download,
        Phase::Partition,
        Phase::Mkfs,
        Phase::Mount,
        Phase::Payloads,
        Phase::Configure,
        Phase::Steps,
        Phase::Unmount,
        Phase::Capture,
        Phase::Upload,
        Phase::Verify,
        Phase::Deploy,
        Phase::Readback,
        Phase::Grow,
    ];

    /// The name in status files, manifests and on the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Check => "check",
            Phase::Download => "download",
            Phase::Partition => "partition",
            Phase::Mkfs => "mkfs",
            Phase::Mount => "mount",
            Phase::Payloads => "payloads",
            Phase::Configure => "configure",
            Phase::Steps => "steps",
            Phase::Unmount => "unmount",
            Phase::Capture => "capture",
            Phase::Upload => "upload",
            Phase::Verify => "verify",
            Phase::Deploy => "deploy",
            Phase::Readback => "readback",
            Phase::Grow => "grow",
        }
    }

    /// Whether the phase's progress is a byte stream (the others count
    /// items, such as filesystems made).
    pub fn counts_bytes(self) -> bool {
        matches!(
            self,
            Phase::Download
                | Phase::Payloads
                | Phase::Capture
                | Phase::Upload
                | Phase::Verify
                | Phase::Deploy
                | Phase::Readback
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Claimed and working through the build phases.
    Building,
    /// Sending the image.
    Uploading,
    /// The upload is complete; waiting for the master to publish it.
    Uploaded,
    /// A deploy job: writing the image onto the disk.
    Deploying,
    /// A deploy job is done; the agent reboots into the deployed system.
    Deployed,
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
    pub phase: Phase,
    /// Progress through the phase, 0.0 to 1.0.
    #[serde(default)]
    pub progress: f32,
    /// Bytes of the phase's stream done (payload bytes read, disk bytes
    /// captured, image bytes uploaded); 0 when the phase counts none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_done: u64,
    /// The bytes the phase's stream holds in all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub started: Timestamp,
    pub updated: Timestamp,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_as_their_serde_form() {
        for p in Phase::ALL {
            let quoted = toml::Value::try_from(p).unwrap();
            assert_eq!(quoted.as_str(), Some(p.as_str()));
            assert_eq!(p.to_string(), p.as_str());
        }
    }
}
