//! Upload throughput over loopback: kiln's uploader (ssh2, SFTP) against
//! OpenSSH's own `scp` and `sftp`, the same cipher, the same test sshd.
//! Run by scripts/bench-upload.sh; `KILN_BENCH_BYTES` sets the size
//! (default 2 GiB of incompressible data).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_e2e::sshd::TestSshd;
use kiln_protocol::claim::claim_next;
use kiln_protocol::manifest::ImageManifest;
use kiln_protocol::master;
use kiln_protocol::sftp::{ServerConfig, SessionOptions, SftpSpool};
use kiln_protocol::time::Timestamp;
use kiln_protocol::uploader::{upload, UploadOptions};
use kiln_protocol::LocalSpool;

const CIPHER: &str = "aes128-gcm@openssh.com";

fn main() -> Result<()> {
    let bytes: u64 = match std::env::var("KILN_BENCH_BYTES") {
        Ok(v) => v.parse().context("KILN_BENCH_BYTES is not a number")?,
        Err(_) => 2 << 30,
    };
    let work = tempfile::Builder::new().prefix("kiln-bench.").tempdir()?;
    let image = work.path().join("image.raw.zst");
    eprintln!("writing {} MiB of incompressible data", bytes >> 20);
    let image_blake3 = write_random(&image, bytes)?;

    let sshd = TestSshd::start()?;
    let spool_dir = work.path().join("spool");
    std::fs::create_dir(&spool_dir)?;
    let local = LocalSpool::new(&spool_dir);
    master::init(&local)?;
    let job = "id = \"bench\"\npriority = 1\ntime_limit = \"1h\"\nmax_attempts = 1\n\
               [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";
    master::add_job(&local, job, Path::new("bench.toml"), Timestamp::now())?;

    let server = ServerConfig {
        address: sshd.address(),
        user: sshd.user().to_string(),
        key: sshd.client_key(),
        host_key: sshd.host_key_line().to_string(),
        spool: spool_dir.display().to_string(),
    };
    let now = Timestamp::now();
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: "bench".into(),
        job_blake3: String::new(),
        agent: "bench".into(),
        disk_size: bytes,
        block_size: 4096,
        bytes_read: bytes,
        image_size: bytes,
        image_blake3,
        payloads: vec![],
        started: now,
        finished: now,
        phases: vec![],
        ranges: vec![],
    };

    let mut rows: Vec<(String, Duration)> = Vec::new();

    let start = Instant::now();
    let fs = SftpSpool::connect(&server, &SessionOptions::default())?;
    let cipher = fs.session().cipher().unwrap_or_default();
    let lease = claim_next(&fs, "bench", now)?.context("the bench job was not claimable")?;
    let report = upload(
        &fs,
        &lease,
        &image,
        &manifest,
        None,
        &UploadOptions::default(),
        &mut |_| {},
    )?;
    rows.push((format!("kiln uploader ({cipher})"), start.elapsed()));
    drop(fs);
    if report.sent != report.chunks {
        bail!("the uploader skipped chunks: {report:?}");
    }
    local_remove(&spool_dir.join("incoming"))?;

    let dest = spool_dir.join("openssh-copy");
    let ssh_opts = |cmd: &mut Command| {
        cmd.args(["-q", "-c", CIPHER, "-i"])
            .arg(sshd.client_key())
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "BatchMode=yes",
                "-P",
            ])
            .arg(sshd.port().to_string());
    };

    let mut scp = Command::new("scp");
    ssh_opts(&mut scp);
    scp.arg(&image)
        .arg(format!("{}@127.0.0.1:{}", sshd.user(), dest.display()));
    rows.push((format!("scp -c {CIPHER}"), timed(&mut scp, None)?));
    check_copy(&dest, bytes)?;

    let mut sftp = Command::new("sftp");
    ssh_opts(&mut sftp);
    sftp.args(["-b", "-"])
        .arg(format!("{}@127.0.0.1", sshd.user()));
    let batch = format!("put {} {}\n", image.display(), dest.display());
    rows.push((format!("sftp -c {CIPHER}"), timed(&mut sftp, Some(&batch))?));
    check_copy(&dest, bytes)?;

    let best_openssh = rows[1..]
        .iter()
        .map(|r| r.1)
        .min()
        .expect("two OpenSSH rows");
    println!("upload of {} MiB over loopback", bytes >> 20);
    println!(
        "{:<42} {:>8} {:>9} {:>12}",
        "tool", "seconds", "MB/s", "vs OpenSSH"
    );
    for (name, t) in &rows {
        let mbps = bytes as f64 / 1e6 / t.as_secs_f64();
        let ratio = best_openssh.as_secs_f64() / t.as_secs_f64() * 100.0;
        println!(
            "{name:<42} {:>8.2} {mbps:>9.1} {ratio:>11.0}%",
            t.as_secs_f64()
        );
    }
    Ok(())
}

fn write_random(path: &Path, bytes: u64) -> Result<String> {
    let mut f = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut stream = blake3::Hasher::new_keyed(&[7; 32]).finalize_xof();
    let mut hash = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    Ok(hash.finalize().to_hex().to_string())
}

fn timed(cmd: &mut Command, stdin: Option<&str>) -> Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(start.elapsed())
}

fn check_copy(dest: &Path, bytes: u64) -> Result<()> {
    let len = std::fs::metadata(dest)
        .with_context(|| format!("reading {}", dest.display()))?
        .len();
    if len != bytes {
        bail!("{} holds {len} bytes, not {bytes}", dest.display());
    }
    std::fs::remove_file(dest)?;
    Ok(())
}

fn local_remove(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}
