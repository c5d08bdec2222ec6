//! The held job's inputs from the job server: the job file, checked against
//! the hash the job list pins, and its payloads.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use kiln_spool::agent::claim::fetch_job;
use kiln_spool::job::{parse_job, JobSpec};
use kiln_spool::lease::Lease;
use kiln_spool::sftp::SftpSpool;
use kiln_spool::spool::{job_path, payload_path, SpoolFs};

use super::job::HeldJob;

/// The job file, checked against the hash the job list pins before it is parsed.
pub(super) fn download_job(spool: &SftpSpool, lease: &Lease) -> Result<(String, JobSpec)> {
    let path = job_path(&lease.job);
    let text = fetch_job(spool, lease).with_context(|| format!("downloading {path}"))?;
    let job = parse_job(&text).map_err(|e| anyhow!("{}", e.in_file(Path::new(&path))))?;
    Ok((text, job))
}

/// Downloads each payload into a cache keyed by its BLAKE3 (checked on the
/// way in) and returns a directory where the job's payload names lead to them.
pub(super) fn fetch_payloads(held: &HeldJob, job: &JobSpec) -> Result<PathBuf> {
    let cache = held.opts.work_dir.join("cache");
    let by_name = held.dir.join("payloads");
    let _ = std::fs::remove_dir_all(&by_name);
    for (i, p) in job.payloads.iter().enumerate() {
        held.beat.set(|st| {
            st.phase = "download".into();
            st.progress = i as f32 / job.payloads.len().max(1) as f32;
            st.message = p.name.clone();
        });
        let want = p
            .blake3
            .as_deref()
            .ok_or_else(|| anyhow!("payloads[{i}] {:?} has no pinned blake3", p.name))?;
        let cached = cache.join(want);
        if cached.exists() {
            held.log
                .line(&format!("payload {} from the cache ({want})", p.name));
        } else {
            let src = payload_path(&p.name);
            let tmp = cache.join(format!(".{want}.part"));
            let got = download_hashed(held.spool, &src, &tmp, &held.beat.abort)
                .with_context(|| format!("downloading {src}"))?;
            if got != want {
                let _ = std::fs::remove_file(&tmp);
                bail!(
                    "payloads[{i}] {:?}: BLAKE3 is {got}, the job pins {want}",
                    p.name
                );
            }
            std::fs::rename(&tmp, &cached)
                .with_context(|| format!("caching {}", cached.display()))?;
            held.log
                .line(&format!("payload {} downloaded ({want})", p.name));
        }
        let link = by_name.join(&p.name);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::os::unix::fs::symlink(&cached, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    std::fs::create_dir_all(&by_name).with_context(|| format!("creating {}", by_name.display()))?;
    Ok(by_name)
}

fn download_hashed(spool: &SftpSpool, src: &str, dst: &Path, abort: &AtomicBool) -> Result<String> {
    let mut r = spool.open_read(src)?;
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?,
    );
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if abort.load(Ordering::SeqCst) {
            bail!("aborted");
        }
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(h.finalize().to_hex().to_string())
}
