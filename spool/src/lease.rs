//! A lease: one agent's claim on one job, with a fencing token and a deadline.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::units::TimeLimit;

use crate::error::{IoContext, Result, SpoolError};
use crate::spool::{lease_path, SpoolFs};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub job: String,
    pub agent: String,
    /// Unique per claim. Uploads are filed under it, and the master publishes
    /// only an upload whose token is the job's current lease.
    pub token: String,
    pub acquired: Timestamp,
    pub deadline: Timestamp,
    pub attempt: u32,
}

impl Lease {
    /// A new lease with a fresh random token.
    pub fn new(
        job: &str,
        agent: &str,
        now: Timestamp,
        time_limit: TimeLimit,
        attempt: u32,
    ) -> Self {
        Lease {
            job: job.to_string(),
            agent: agent.to_string(),
            token: format!("{attempt}-{}", crate::spool::random_hex(12)),
            acquired: now,
            deadline: now.plus(time_limit.as_duration()),
            attempt,
        }
    }

    pub fn expired(&self, now: Timestamp) -> bool {
        now >= self.deadline
    }

    /// Seconds left before the deadline; negative once past it.
    pub fn remaining(&self, now: Timestamp) -> i64 {
        now.secs_until(self.deadline)
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a lease always serializes")
    }
}

/// Checks that a token names a lease: `<attempt>-<hex>`, nothing that could
/// climb out of `incoming/<job>/`.
pub fn check_token(token: &str) -> Result<(), String> {
    let ok = !token.is_empty()
        && token.len() <= 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a lease token",
            token.escape_debug().to_string()
        ))
    }
}

/// Reads a job's lease, `None` if it has none. A lease that cannot be parsed
/// is an error: it still blocks the job until the master clears it.
pub fn read_lease(fs: &dyn SpoolFs, id: &str) -> Result<Option<Lease>> {
    let path = lease_path(id);
    let Some(bytes) = fs.read_opt(&path).ctx(|| format!("reading {path}"))? else {
        return Ok(None);
    };
    Lease::parse(&String::from_utf8_lossy(&bytes))
        .map(Some)
        .map_err(|e| SpoolError::Corrupt {
            path,
            problem: e.to_string(),
        })
}
