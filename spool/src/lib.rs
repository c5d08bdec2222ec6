//! kiln's spool: the job spec, the spool layout, and the rules by
//! which agents claim jobs and the master reaps leases and publishes images.
//!
//! Parsing is pure (`parse_job(&str)`), I/O is thin (`load_job(&Path)`), and
//! every rule takes the current time as a parameter so it can be tested
//! without sleeping.

pub mod agent;
pub mod agent_config;
pub mod beneath;
pub mod error;
pub mod job;
pub mod lease;
pub mod manifest;
pub mod master;
pub mod names;
pub mod printable;
pub mod queue;
#[cfg(feature = "sftp")]
pub mod sftp;
pub mod signature;
pub mod spool;
pub mod status;
pub mod stream;
pub mod time;
pub mod units;
pub mod untrusted;
pub mod upload;

pub use job::{load_job, parse_job, JobError, JobSpec};
pub use spool::{LocalSpool, SpoolFs};
