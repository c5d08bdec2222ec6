//! The held job's inputs from the job server: the job file, checked against
//! the hash the job list pins, and its payloads, streamed over SFTP straight
//! into extraction. No payload byte is staged on the agent: its `/tmp` is
//! RAM on a PXE-booted machine.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use kiln_spool::agent::claim::fetch_job;
use kiln_spool::job::{parse_job, JobSpec, Payload};
use kiln_spool::lease::Lease;
use kiln_spool::sftp::SftpSpool;
use kiln_spool::spool::{job_path, payload_path, SpoolFs};

use crate::payload::PayloadSource;
use crate::Error;

/// The job file, checked against the hash the job list pins before it is parsed.
pub(super) fn download_job(spool: &SftpSpool, lease: &Lease) -> Result<(String, JobSpec)> {
    let path = job_path(&lease.job);
    let text = fetch_job(spool, lease).with_context(|| format!("downloading {path}"))?;
    let job = parse_job(&text).map_err(|e| anyhow!("{}", e.in_file(Path::new(&path))))?;
    Ok((text, job))
}

/// The job server's `payloads/`, read as streams. The build checks each
/// stream's BLAKE3 against the job's pin when the stream ends.
pub(super) struct ServerPayloads<'a> {
    pub spool: &'a SftpSpool,
}

impl PayloadSource for ServerPayloads<'_> {
    /// Every payload is pinned and on the server: a missing one fails the
    /// job before the disk is touched.
    fn check(&self, payloads: &[Payload]) -> crate::Result<Vec<u64>> {
        let mut sizes = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            if p.blake3.is_none() {
                return Err(Error::Input(format!(
                    "payloads[{i}] {:?} has no pinned blake3",
                    p.name
                )));
            }
            let path = payload_path(&p.name);
            let size = self
                .spool
                .size(&path)
                .map_err(|e| Error::Input(format!("payloads[{i}] {:?}: {path}: {e}", p.name)))?
                .ok_or_else(|| {
                    Error::Input(format!(
                        "payloads[{i}] {:?}: {path} is not on the job server",
                        p.name
                    ))
                })?;
            sizes.push(size);
        }
        Ok(sizes)
    }

    fn open(&self, _i: usize, p: &Payload) -> crate::Result<Box<dyn Read + '_>> {
        let path = payload_path(&p.name);
        self.spool.open_read(&path).map_err(|source| Error::Io {
            what: format!("downloading {path}"),
            source,
        })
    }
}
