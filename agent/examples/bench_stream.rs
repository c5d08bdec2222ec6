//! The streamed pipeline against its targets, in one run (scripts/bench-stream.sh):
//!
//! 1. `kiln-agent run --once` builds and uploads a job whose payload holds
//!    `KILN_BENCH_BYTES` (default 2 GiB) of incompressible data, against a
//!    test sshd on 127.0.0.1; its peak RSS is held against 96 MiB plus the
//!    default upload window, and the time from start to published is shown.
//! 2. On the disk it built: today's staged flow (capture to a file, then
//!    upload the file) against the streamed capture+upload, with the same
//!    zstd workers and chunks. Target: streamed no longer than the slower of
//!    capture and upload plus 15%.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_agent::capture::window::split_window_here;
use kiln_agent::capture::{capture, capture_to, CaptureOptions};
use kiln_e2e::sshd::TestSshd;
use kiln_spool::agent::claim::claim_next;
use kiln_spool::agent::uploader::{
    upload, upload_stream, StreamOptions, UploadOptions, DEFAULT_CHUNK_SIZE,
};
use kiln_spool::agent_config::DEFAULT_UPLOAD_WINDOW;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::master::{self, job_view, reap, JobState};
use kiln_spool::sftp::{ServerConfig, SessionOptions, SftpSpool};
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

const MIB: f64 = (1u64 << 20) as f64;
/// The agent's fixed needs beside the window.
const BASE_RSS: u64 = 96 << 20;

fn main() -> Result<()> {
    let bytes: u64 = match std::env::var("KILN_BENCH_BYTES") {
        Ok(v) => v.parse().context("KILN_BENCH_BYTES is not a number")?,
        Err(_) => 2 << 30,
    };
    let agent = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("kiln-agent"))
        .context("locating kiln-agent")?;
    if !agent.exists() {
        bail!(
            "{} is missing: cargo build --release -p kiln-agent",
            agent.display()
        );
    }
    let work = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let spool_dir = work.path().join("spool");
    std::fs::create_dir(&spool_dir)?;
    let local = LocalSpool::new(&spool_dir);
    master::init(&local)?;
    eprintln!(
        "writing a payload of {} MiB of incompressible data",
        bytes >> 20
    );
    noise_payload(work.path(), &spool_dir.join("payloads/noise.tar"), bytes)?;
    for (id, priority) in [("streamed-run", 900), ("staged", 500), ("streamed", 400)] {
        let text = format!(
            "id = \"{id}\"\npriority = {priority}\ntime_limit = \"1h\"\nmax_attempts = 1\n\
             [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\
             [[payloads]]\nname = \"noise.tar\"\ndest = \"/srv\"\n"
        );
        master::add_job(&local, &text, Path::new("bench.toml"), Timestamp::now())?;
    }
    let sshd = TestSshd::start()?;
    let server = ServerConfig {
        address: sshd.address(),
        user: sshd.user().to_string(),
        key: sshd.client_key(),
        host_key: sshd.host_key_line().trim().to_string(),
        spool: spool_dir.display().to_string(),
    };
    let disk = work.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(bytes + (bytes / 8).max(256 << 20))?;
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "id = \"bench\"\npoll_interval = \"1s\"\n[[servers]]\naddress = \"{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\nspool = \"{}\"\n",
            server.address,
            server.user,
            server.key.display(),
            server.host_key,
            server.spool
        ),
    )?;

    // 1. The agent as a process: peak RSS, start to published.
    let t0 = Instant::now();
    let mut child = Command::new(&agent)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--disk")
        .arg(&disk)
        .arg("--work-dir")
        .arg(work.path().join("work"))
        .arg("--once")
        .spawn()
        .context("starting kiln-agent")?;
    let (code, max_rss) = wait_with_rss(child.id() as i32)?;
    let _ = child.try_wait();
    let built = t0.elapsed();
    if code != 0 {
        bail!("kiln-agent run exited with {code}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while job_view(&local, "streamed-run", Timestamp::now())?.state != JobState::Done {
        reap(&local, Timestamp::now())?;
        if Instant::now() > deadline {
            bail!("the job was never published");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let published = t0.elapsed();
    let target = BASE_RSS + DEFAULT_UPLOAD_WINDOW;
    println!(
        "agent run of a job with {} MiB of incompressible data, upload window {} MiB",
        bytes >> 20,
        DEFAULT_UPLOAD_WINDOW >> 20
    );
    println!(
        "  peak RSS {:.1} MiB; target at most {:.0} MiB (96 MiB + window): {}",
        max_rss as f64 / MIB,
        target as f64 / MIB,
        if max_rss <= target { "met" } else { "MISSED" }
    );
    println!(
        "  build and upload {:.1}s, published after {:.1}s",
        built.as_secs_f64(),
        published.as_secs_f64()
    );

    // 2. Staged against streamed, on the disk the agent built.
    let split = split_window_here(DEFAULT_UPLOAD_WINDOW, DEFAULT_CHUNK_SIZE);
    let opts = CaptureOptions {
        level: 3,
        threads: split.workers,
    };
    let fs = SftpSpool::connect(&server, &SessionOptions::default())?;
    let abort = AtomicBool::new(false);
    let image = work.path().join("staged.raw.zst");
    let staged = claim_next(&local, "bench", Timestamp::now())?.context("claiming staged")?;
    let t = Instant::now();
    let cap = capture(&disk, &image, &opts, &mut |_| {}, &abort)?;
    let capture_s = t.elapsed().as_secs_f64();
    let manifest = manifest_for(&staged.job, &cap);
    let t = Instant::now();
    let chunks = UploadOptions {
        chunk_size: split.chunks.chunk_size,
    };
    upload(&fs, &staged, &image, &manifest, None, &chunks, &mut |_| {})?;
    let upload_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&image)?;

    let streamed = claim_next(&local, "bench", Timestamp::now())?.context("claiming streamed")?;
    let progress = |_: &kiln_spool::agent::uploader::UploadProgress| {};
    let stream = StreamOptions {
        plan: split.chunks,
        job_log: None,
        resume: None,
        progress: &progress,
    };
    let t = Instant::now();
    let report = upload_stream(&fs, &streamed, &stream, |sink| {
        let cap = capture_to(&disk, sink, &opts, &mut |_| {}, &abort)?;
        Ok::<_, kiln_agent::Error>(manifest_for(&streamed.job, &cap))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stream_s = t.elapsed().as_secs_f64();
    if report.image_blake3 != cap.image_blake3 {
        bail!(
            "the streamed capture ({} bytes, {}) differs from the staged one ({} bytes, {})",
            report.image_size,
            report.image_blake3,
            cap.image_size,
            cap.image_blake3
        );
    }
    let size = cap.image_size as f64 / MIB;
    let slower = capture_s.max(upload_s);
    println!(
        "capture and upload of the built disk: {size:.0} MiB image, {} zstd workers, {} chunks of {} MiB",
        split.workers,
        split.chunks.buffers,
        split.chunks.chunk_size >> 20
    );
    println!("  {:<30} {:>8} {:>10}", "flow", "seconds", "MiB/s");
    println!(
        "  {:<30} {:>8.2} {:>10.0}",
        "staged: capture to a file",
        capture_s,
        size / capture_s
    );
    println!(
        "  {:<30} {:>8.2} {:>10.0}",
        "staged: upload the file",
        upload_s,
        size / upload_s
    );
    println!(
        "  {:<30} {:>8.2} {:>10.0}",
        "staged: both",
        capture_s + upload_s,
        size / (capture_s + upload_s)
    );
    println!(
        "  {:<30} {:>8.2} {:>10.0}",
        "streamed",
        stream_s,
        size / stream_s
    );
    println!(
        "  target: streamed at most the slower of capture and upload + 15% ({:.2}s): {} ({:.0}% of it)",
        slower * 1.15,
        if stream_s <= slower * 1.15 { "met" } else { "MISSED" },
        100.0 * stream_s / slower
    );
    drop(fs);
    drop(sshd);
    Ok(())
}

/// `payloads/noise.tar`: one file of `bytes` bytes that do not compress.
fn noise_payload(work: &Path, tar: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let src: PathBuf = work.join("noise");
    std::fs::create_dir(&src)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(src.join("noise.bin"))?);
    let mut xof = blake3::Hasher::new().update(b"bench").finalize_xof();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    let st = Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar failed");
    }
    std::fs::remove_dir_all(&src)?;
    Ok(())
}

fn manifest_for(job: &str, cap: &kiln_agent::capture::CaptureResult) -> ImageManifest {
    let now = Timestamp::now();
    ImageManifest {
        format: "raw.zst".into(),
        job: job.into(),
        job_blake3: String::new(),
        agent: "bench".into(),
        disk_size: cap.disk_size,
        block_size: cap.block_size,
        bytes_read: cap.bytes_read,
        image_size: cap.image_size,
        image_blake3: cap.image_blake3.clone(),
        payloads: vec![],
        started: now,
        finished: now,
        phases: vec![],
        ranges: cap.ranges.clone(),
        generalized: Vec::new(),
        provenance: None,
    }
}

/// Waits for `pid`; its exit code and peak RSS in bytes.
fn wait_with_rss(pid: i32) -> Result<(i32, u64)> {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and usage point to live values.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!(
            "waiting for kiln-agent: {}",
            std::io::Error::last_os_error()
        );
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, usage.ru_maxrss as u64 * 1024))
}
