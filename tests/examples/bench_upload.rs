//! Upload throughput over loopback: kiln's uploader (ssh2, SFTP) against
//! OpenSSH's own `scp` and `sftp`, the same cipher, the same test sshd.
//! The three take turns, several rounds in one run, and the table shows the
//! median of each. Run by scripts/bench-upload.sh.
//!
//! `KILN_BENCH_BYTES` sets the size (default 2 GiB of incompressible data),
//! `KILN_BENCH_ROUNDS` the rounds (default 3), `KILN_BENCH_TOOLS` which of
//! `kiln,scp,sftp` run (default all three).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_e2e::sshd::TestSshd;
use kiln_spool::agent::claim::claim_next;
use kiln_spool::agent::uploader::{upload, UploadOptions};
use kiln_spool::lease::Lease;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::master;
use kiln_spool::sftp::{ServerConfig, SessionOptions, SftpSpool};
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

const CIPHER: &str = "aes128-gcm@openssh.com";
const TOOLS: [&str; 3] = ["kiln", "scp", "sftp"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Bench {
    sshd: TestSshd,
    server: ServerConfig,
    spool_dir: std::path::PathBuf,
    image: std::path::PathBuf,
    manifest: ImageManifest,
    lease: Lease,
    bytes: u64,
}

fn main() -> Result<()> {
    let bytes: u64 = env_or("KILN_BENCH_BYTES", 2 << 30)?;
    let rounds: usize = env_or("KILN_BENCH_ROUNDS", 3)?.max(1);
    let tools: Vec<String> = std::env::var("KILN_BENCH_TOOLS")
        .unwrap_or_else(|_| TOOLS.join(","))
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(t) = tools.iter().find(|t| !TOOLS.contains(&t.as_str())) {
        bail!("KILN_BENCH_TOOLS: unknown tool {t:?} (known: kiln, scp, sftp)");
    }
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
    let now = Timestamp::now();
    let lease = claim_next(&local, "bench", now)?.context("the bench job was not claimable")?;

    let server = ServerConfig {
        address: sshd.address(),
        user: sshd.user().to_string(),
        key: sshd.client_key(),
        host_key: sshd.host_key_line().to_string(),
        spool: spool_dir.display().to_string(),
    };
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
        generalized: Vec::new(),
        provenance: None,
    };
    let bench = Bench {
        sshd,
        server,
        spool_dir,
        image,
        manifest,
        lease,
        bytes,
    };

    let load_before = load_average();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); tools.len()];
    for round in 0..rounds {
        for (i, tool) in tools.iter().enumerate() {
            let t = match tool.as_str() {
                "kiln" => bench.kiln()?,
                "scp" => bench.scp()?,
                _ => bench.sftp()?,
            };
            eprintln!(
                "round {}: {tool:<5} {:>7.2} s {:>7.1} MB/s",
                round + 1,
                t.as_secs_f64(),
                mb_per_s(bytes, t)
            );
            times[i].push(t);
        }
    }
    let medians: Vec<Duration> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect();

    println!(
        "upload of {bytes} bytes ({} MiB) over loopback, cipher {CIPHER}, median of {rounds} round(s)",
        bytes >> 20
    );
    println!(
        "load average: {load_before} before, {} after",
        load_average()
    );
    println!(
        "{:<6} {:>12} {:>9} {:>9}",
        "tool", "bytes", "seconds", "MB/s"
    );
    for (tool, t) in tools.iter().zip(&medians) {
        println!(
            "{tool:<6} {bytes:>12} {:>9.2} {:>9.1}",
            t.as_secs_f64(),
            mb_per_s(bytes, *t)
        );
    }
    if let Some(k) = tools.iter().position(|t| t == "kiln") {
        for (tool, t) in tools.iter().zip(&medians) {
            if tool != "kiln" {
                println!(
                    "kiln is {:.0}% of {tool}'s throughput (target at least 90%)",
                    t.as_secs_f64() / medians[k].as_secs_f64() * 100.0
                );
            }
        }
    }
    Ok(())
}

fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

impl Bench {
    /// One upload by kiln's uploader on a fresh connection; the time
    /// includes connecting, as it does for scp and sftp.
    fn kiln(&self) -> Result<Duration> {
        let start = Instant::now();
        let fs = SftpSpool::connect(&self.server, &SessionOptions::default())?;
        let cipher = fs.session().cipher().unwrap_or_default();
        if cipher != CIPHER {
            bail!("kiln negotiated {cipher:?}, not {CIPHER}");
        }
        let report = upload(
            &fs,
            &self.lease,
            &self.image,
            &self.manifest,
            None,
            &UploadOptions::default(),
            &mut |_| {},
        )?;
        drop(fs);
        let t = start.elapsed();
        if report.sent != report.chunks {
            bail!("the uploader skipped chunks: {report:?}");
        }
        let dir = self.spool_dir.join(&report.dir);
        let held: u64 = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("chunk-"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        if held != self.bytes {
            bail!(
                "{} holds {held} bytes of chunks, not {}",
                dir.display(),
                self.bytes
            );
        }
        local_remove(&self.spool_dir.join("incoming"))?;
        Ok(t)
    }

    fn ssh_opts(&self, cmd: &mut Command) {
        cmd.args(["-q", "-c", CIPHER, "-i"])
            .arg(self.sshd.client_key())
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "BatchMode=yes",
                "-P",
            ])
            .arg(self.sshd.port().to_string());
    }

    fn dest(&self) -> std::path::PathBuf {
        self.spool_dir.join("openssh-copy")
    }

    fn scp(&self) -> Result<Duration> {
        let mut scp = Command::new("scp");
        self.ssh_opts(&mut scp);
        scp.arg(&self.image).arg(format!(
            "{}@127.0.0.1:{}",
            self.sshd.user(),
            self.dest().display()
        ));
        let t = timed(&mut scp, None)?;
        check_copy(&self.dest(), self.bytes)?;
        Ok(t)
    }

    fn sftp(&self) -> Result<Duration> {
        let mut sftp = Command::new("sftp");
        self.ssh_opts(&mut sftp);
        sftp.args(["-b", "-"])
            .arg(format!("{}@127.0.0.1", self.sshd.user()))
            .stdout(Stdio::null());
        let batch = format!("put {} {}\n", self.image.display(), self.dest().display());
        let t = timed(&mut sftp, Some(&batch))?;
        check_copy(&self.dest(), self.bytes)?;
        Ok(t)
    }
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
