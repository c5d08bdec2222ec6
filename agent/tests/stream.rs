//! The streamed capture and upload of `kiln-agent run` against OpenSSH's
//! sshd on 127.0.0.1: a link cut mid-stream resumes; an agent killed
//! mid-stream and started again takes its upload up and skips the chunks
//! the server holds; one whose lease was lost meanwhile leaves the new
//! holder's upload the only one published. Each published image is the
//! same bytes as a capture of the built disk without cuts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::sshd::skip_without_sshd;
use kiln_spool::master::{job_view, read_history, JobState};
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

use common::server::Server;
use common::AGENT;

/// Bytes of noise in the job's payload: about as many of image.
const NOISE: usize = 40 << 20;

/// A job server with one job, `id`, whose payload is `NOISE` bytes that
/// do not compress.
fn with_job(id: &str, time_limit: &str) -> Server {
    let server = Server::start();
    let src = server.dir.path().join("noise");
    std::fs::create_dir_all(&src).unwrap();
    let mut noise = vec![0u8; NOISE];
    blake3::Hasher::new()
        .update(id.as_bytes())
        .finalize_xof()
        .fill(&mut noise);
    std::fs::write(src.join("noise.bin"), &noise).unwrap();
    server.add_payload("noise.tar", &src);
    server.add_job(&format!(
        "id = \"{id}\"\npriority = 500\ntime_limit = \"{time_limit}\"\nmax_attempts = 3\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\
         [[payloads]]\nname = \"noise.tar\"\ndest = \"/srv\"\n[configure]\nhostname = \"{id}\"\n"
    ));
    server
}

/// What these tests watch on the server: chunks arriving, the published image.
trait Uploads {
    fn wait_for_chunk(&self, job: &str, n: usize) -> PathBuf;
    fn published(&self, job: &str) -> Vec<u8>;
}

impl Uploads for Server {
    /// The upload directory of the first token that has chunk `n` whole.
    fn wait_for_chunk(&self, job: &str, n: usize) -> PathBuf {
        let incoming = self.dir.path().join("incoming").join(job);
        let name = kiln_spool::upload::chunk_name(n);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let found = std::fs::read_dir(&incoming)
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| t.path())
                .find(|t| t.join(&name).exists());
            if let Some(dir) = found {
                return dir;
            }
            assert!(Instant::now() < deadline, "{name} of {job} never came");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn published(&self, job: &str) -> Vec<u8> {
        std::fs::read(self.spool.path(&format!("images/{job}/image.raw.zst"))).unwrap()
    }
}

/// One agent: its config (a small upload window, 1 MiB chunks), disk
/// image file and scratch directory.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(id: &str, server: &Server) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "id = \"{id}\"\npoll_interval = \"1s\"\nupload_window = \"8MiB\"\n{}",
            server.config_block()
        );
        std::fs::write(dir.path().join("agent.toml"), cfg).unwrap();
        let disk = std::fs::File::create(dir.path().join("disk.img")).unwrap();
        disk.set_len(96 << 20).unwrap();
        Agent { dir }
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn spawn_once(&self) -> Child {
        Command::new(AGENT)
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("--disk")
            .arg(self.disk())
            .arg("--work-dir")
            .arg(self.dir.path().join("work"))
            .args(["--chunk-size", "1MiB", "--once"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn once(&self) -> (i32, String) {
        let out = self.spawn_once().wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A capture of the built disk by `kiln-agent capture`, with no upload.
    fn capture(&self) -> Vec<u8> {
        let out = self.dir.path().join("reference.raw.zst");
        let r = Command::new(AGENT)
            .arg("capture")
            .arg("--disk")
            .arg(self.disk())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(out).unwrap()
    }

    /// A SIGKILLed agent leaves its mounts and loop device behind; a real
    /// machine would reboot. Clean them up so the test leaves nothing.
    fn release_leftovers(&self) {
        let work = self.dir.path().join("work");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&*work.to_string_lossy()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        if let Ok(out) = Command::new("losetup").arg("-j").arg(self.disk()).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
    }
}

/// Whether the test can run: a missing tool fails it with the reason.
fn can_run(test: &str) -> bool {
    assert!(
        common::can_run(test),
        "{test} cannot run here: the line above says why"
    );
    !skip_without_sshd()
}

fn verify_published(spool: &LocalSpool, id: &str) {
    let dir = spool.path(&format!("images/{id}"));
    let out = Command::new(AGENT)
        .arg("verify")
        .arg(dir.join("image.raw.zst"))
        .arg("--manifest")
        .arg(dir.join("manifest.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_no_manifest(upload: &Path) {
    assert!(
        !upload.join("manifest.toml").exists(),
        "the upload finished before the cut; the test did not cut anything"
    );
}

#[test]
fn a_stream_cut_by_an_sshd_restart_resumes_to_the_same_image() {
    if !can_run("a_stream_cut_by_an_sshd_restart_resumes_to_the_same_image") {
        return;
    }
    let mut server = with_job("cut", "10m");
    let agent = Agent::new("agent-1", &server);
    let child = agent.spawn_once();
    let upload = server.wait_for_chunk("cut", 2);
    server.sshd.kill();
    assert_no_manifest(&upload);
    std::thread::sleep(Duration::from_millis(500));
    server.sshd.restart().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");

    server.reap_until("cut to be published", Duration::from_secs(60), |s| {
        job_view(s, "cut", Timestamp::now()).unwrap().state == JobState::Done
    });
    verify_published(&server.spool, "cut");
    let log = std::fs::read_to_string(server.spool.path("images/cut/job.log")).unwrap();
    assert!(log.contains("upload interrupted"), "no cut:\n{log}");
    assert!(log.contains("upload resumed at chunk"), "no resume:\n{log}");
    let published = server.published("cut");
    assert!(published.len() > NOISE, "{} bytes", published.len());
    assert!(
        published == agent.capture(),
        "the published image differs from a capture of the same disk"
    );
}

#[test]
fn a_restarted_agent_takes_its_upload_up_and_skips_what_the_server_holds() {
    if !can_run("a_restarted_agent_takes_its_upload_up_and_skips_what_the_server_holds") {
        return;
    }
    let server = with_job("again", "10m");
    let agent = Agent::new("agent-1", &server);
    let mut child = agent.spawn_once();
    let upload = server.wait_for_chunk("again", 4);
    child.kill().unwrap();
    let _ = child.wait();
    assert_no_manifest(&upload);
    agent.release_leftovers();
    let held = std::fs::read_dir(&upload)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chunk-"))
        .count();
    assert!(held >= 5, "{held} chunks");

    let (code, out) = agent.once();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("taking up the upload"), "{out}");
    server.reap_until("again to be published", Duration::from_secs(60), |s| {
        job_view(s, "again", Timestamp::now()).unwrap().state == JobState::Done
    });
    verify_published(&server.spool, "again");
    let history = read_history(&server.spool).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    let status = history[0].status.clone().expect("a final status");
    let skipped: usize = status
        .message
        .split(", ")
        .nth(1)
        .and_then(|p| p.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", status.message));
    assert!(
        skipped >= held,
        "{held} chunks were held, {skipped} skipped: {:?}",
        status.message
    );
    assert!(
        server.published("again") == agent.capture(),
        "the published image differs from a capture of the same disk"
    );
}

#[test]
fn an_agent_restarted_after_losing_its_lease_leaves_the_new_holders_image() {
    if !can_run("an_agent_restarted_after_losing_its_lease_leaves_the_new_holders_image") {
        return;
    }
    let server = with_job("lost", "20s");
    let first = Agent::new("agent-1", &server);
    let mut child = first.spawn_once();
    let upload = server.wait_for_chunk("lost", 2);
    child.kill().unwrap();
    let _ = child.wait();
    assert_no_manifest(&upload);
    first.release_leftovers();

    server.reap_until(
        "agent-1's lease to be reaped",
        Duration::from_secs(90),
        |s| {
            let v = job_view(s, "lost", Timestamp::now()).unwrap();
            v.state == JobState::Queued && v.attempts == 1
        },
    );
    let second = Agent::new("agent-2", &server);
    let (code, out) = second.once();
    assert_eq!(code, 0, "{out}");

    // agent-1 comes back: its lease is gone, so it drops its upload.
    let (code, out) = first.once();
    assert!(out.contains("the lease was lost"), "{out}");
    assert_eq!(code, 3, "{out}");
    assert_no_manifest(&upload);

    server.reap_until(
        "agent-2's image to be published",
        Duration::from_secs(60),
        |s| job_view(s, "lost", Timestamp::now()).unwrap().state == JobState::Done,
    );
    let history = read_history(&server.spool).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].agent, "agent-2");
    verify_published(&server.spool, "lost");
    assert!(
        server.published("lost") == second.capture(),
        "the published image is not agent-2's"
    );
}
