//! Random bytes standing in for a captured image, with the manifest an
//! agent would upload beside them: enough for the master to verify and
//! publish, without building a disk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kiln_spool::manifest::ImageManifest;
use kiln_spool::time::Timestamp;

/// Writes `size` random bytes to `dir/<job>.raw.zst` and returns the file
/// and a manifest for it, built from the job file whose BLAKE3 is `job_blake3`.
pub fn random_image(
    dir: &Path,
    job: &str,
    job_blake3: &str,
    size: usize,
) -> Result<(PathBuf, ImageManifest)> {
    let mut data = vec![0u8; size];
    getrandom::getrandom(&mut data).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    let path = dir.join(format!("{job}.raw.zst"));
    std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
    let now = Timestamp::now();
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: job.into(),
        job_blake3: job_blake3.into(),
        agent: "agent-1".into(),
        disk_size: 8 << 30,
        block_size: 4096,
        bytes_read: size as u64,
        image_size: size as u64,
        image_blake3: blake3::hash(&data).to_hex().to_string(),
        payloads: vec![],
        started: now,
        finished: now,
        phases: vec![],
        ranges: vec![],
        generalized: Vec::new(),
        provenance: None,
    };
    Ok((path, manifest))
}

/// BLAKE3 of a file, streamed.
pub fn file_blake3(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}
