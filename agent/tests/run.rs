//! `kiln-agent run` as a process against OpenSSH's sshd on 127.0.0.1: claims,
//! builds on a loop device, uploads; the master reaps and publishes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::sshd::skip_without_sshd;
use kiln_spool::agent::uploader::{upload, UploadOptions};
use kiln_spool::lease::Lease;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::master::reap;
use kiln_spool::master::{job_view, read_history, JobState};
use kiln_spool::status::read_status;
use kiln_spool::status::{AgentState, Phase};
use kiln_spool::time::Timestamp;
use kiln_spool::{LocalSpool, SpoolFs};

use common::server::Server;
use common::{Mounted, AGENT};

/// A job server whose payload `base.tar` is a tiny root: an os-release
/// and busybox-static (which needs no libraries) as the shell for target
/// steps.
fn server_with_base() -> Server {
    let server = Server::start();
    let root = server.dir.path().join("payload-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "NAME=kiln-test\n").unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    server.add_payload("base.tar", &root);
    server
}

/// This file's jobs: one ext4 root with the base payload.
trait Jobs {
    fn add(&self, id: &str, priority: u32, time_limit: &str, steps: &str);
}

impl Jobs for Server {
    fn add(&self, id: &str, priority: u32, time_limit: &str, steps: &str) {
        self.add_job(&format!(
            "id = \"{id}\"\npriority = {priority}\ntime_limit = \"{time_limit}\"\nmax_attempts = 2\n\
             [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\
             [[payloads]]\nname = \"base.tar\"\n[configure]\nhostname = \"{id}\"\n{steps}"
        ));
    }
}

/// One agent: its config, disk image file and scratch directory.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(id: &str, servers: &[&Server]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = format!("id = \"{id}\"\npoll_interval = \"1s\"\n");
        for s in servers {
            cfg.push_str(&s.config_block());
        }
        std::fs::write(dir.path().join("agent.toml"), cfg).unwrap();
        let disk = std::fs::File::create(dir.path().join("disk.img")).unwrap();
        disk.set_len(128 << 20).unwrap();
        Agent { dir }
    }

    fn command(&self, once: bool) -> Command {
        let mut c = Command::new(AGENT);
        c.arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("--disk")
            .arg(self.dir.path().join("disk.img"))
            .arg("--work-dir")
            .arg(self.dir.path().join("work"))
            .args(["--chunk-size", "1MiB"]);
        if once {
            c.arg("--once");
        }
        c
    }

    fn once(&self) -> (i32, String) {
        let out = self.command(true).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn spawn(&self) -> Child {
        self.command(false).stderr(Stdio::piped()).spawn().unwrap()
    }
}

/// Whether the test can run: a missing tool fails it with the reason.
fn can_run(test: &str) -> bool {
    assert!(
        Path::new("/bin/busybox").exists(),
        "{test}: /bin/busybox is missing (install busybox-static)"
    );
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

/// Job ids in the order an agent's output says it claimed them.
fn claims(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            l.split_once("claimed ")
                .map(|(_, rest)| rest.split(' ').next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn one_agent_builds_one_job_and_it_is_published() {
    if !can_run("one_agent_builds_one_job_and_it_is_published") {
        return;
    }
    let server = server_with_base();
    server.add("web", 500, "10m", "");
    let agent = Agent::new("agent-1", &[&server]);
    let (code, out) = agent.once();
    assert_eq!(code, 0, "{out}\n{}", server.sshd.log_tail());
    let status = read_status(&server.spool, "web")
        .unwrap()
        .expect("a status record");
    assert_eq!(status.state, AgentState::Uploaded, "{status:?}");
    assert_eq!(status.agent, "agent-1");

    server.reap_until("web to be published", Duration::from_secs(30), |s| {
        job_view(s, "web", Timestamp::now()).unwrap().state == JobState::Done
    });
    verify_published(&server.spool, "web");
    let history = read_history(&server.spool).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].agent, "agent-1");

    // How it was made: the agent's machine, every phase with its start, the
    // payload as streamed; the master's signature over all of it.
    let text = String::from_utf8(server.spool.read("images/web/manifest.toml").unwrap()).unwrap();
    let m = ImageManifest::parse(&text).unwrap();
    common::assert_run_provenance(&m, 128 << 20);
    let p = m.provenance.as_ref().unwrap();
    assert!(p.signer.starts_with("SHA256:"), "{p:?}");
    let tar = std::fs::read(server.dir.path().join("payloads/base.tar")).unwrap();
    assert_eq!(m.payloads.len(), 1);
    assert_eq!(m.payloads[0].name, "base.tar");
    assert_eq!(
        m.payloads[0].blake3,
        blake3::hash(&tar).to_hex().to_string()
    );

    let (code, out) = agent.once();
    assert_eq!(code, 3, "no job left: {out}");
}

#[test]
fn an_agent_asks_its_servers_in_turn() {
    if !can_run("an_agent_asks_its_servers_in_turn") {
        return;
    }
    let (a, b) = (server_with_base(), server_with_base());
    a.add("a-high", 900, "10m", "");
    a.add("a-low", 100, "10m", "");
    b.add("b-high", 500, "10m", "");
    b.add("b-low", 50, "10m", "");
    let agent = Agent::new("agent-1", &[&a, &b]);
    let child = agent.spawn();
    let done = |s: &LocalSpool| read_history(s).unwrap().len() == 2;
    a.reap_until("a's jobs", Duration::from_secs(120), done);
    b.reap_until("b's jobs", Duration::from_secs(120), done);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        claims(&out),
        ["a-high", "b-high", "a-low", "b-low"],
        "{out}"
    );
    for (s, id) in [(&a, "a-high"), (&a, "a-low"), (&b, "b-high"), (&b, "b-low")] {
        verify_published(&s.spool, id);
    }
}

#[test]
fn eight_agents_do_twenty_four_jobs_each_once() {
    if !can_run("eight_agents_do_twenty_four_jobs_each_once") {
        return;
    }
    let server = server_with_base();
    for i in 0..24 {
        server.add(&format!("job-{i:02}"), (i * 37 % 1000) as u32, "10m", "");
    }
    let agents: Vec<Agent> = (0..8)
        .map(|i| Agent::new(&format!("agent-{i}"), &[&server]))
        .collect();
    let children: Vec<Child> = agents.iter().map(Agent::spawn).collect();
    server.reap_until("24 published jobs", Duration::from_secs(600), |s| {
        read_history(s).unwrap().len() == 24
    });
    let mut claimed = BTreeMap::new();
    for mut child in children {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let _ = child.wait();
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        for l in err.lines().filter(|l| l.contains("failed")) {
            eprintln!("{l}");
        }
        for id in claims(&err) {
            *claimed.entry(id).or_insert(0) += 1;
        }
    }
    assert_eq!(claimed.len(), 24, "{claimed:?}");
    assert!(
        claimed.values().all(|&n| n == 1),
        "a job was claimed twice: {claimed:?}"
    );
    let builders: BTreeSet<String> = read_history(&server.spool)
        .unwrap()
        .into_iter()
        .map(|h| h.agent)
        .collect();
    assert!(builders.len() > 1, "only {builders:?} did any work");
    assert_eq!(server.spool.list("images").unwrap().len(), 24);
    for i in [0, 11, 23] {
        verify_published(&server.spool, &format!("job-{i:02}"));
    }
}

#[test]
fn a_killed_agent_is_reaped_and_its_late_upload_refused() {
    if !can_run("a_killed_agent_is_reaped_and_its_late_upload_refused") {
        return;
    }
    let server = server_with_base();
    let marker = server.dir.path().join("first-attempt");
    // The first attempt stalls in its step; later ones go straight through.
    let step = format!(
        "[[steps]]\nname = \"stall-once\"\nwhere = \"agent\"\ntime_limit = \"10m\"\nrun = \"if [ ! -e {m} ]; then touch {m}; sleep 600; fi\"\n",
        m = marker.display()
    );
    server.add("slow", 500, "15s", &step);
    let first = Agent::new("agent-1", &[&server]);
    let mut child = first.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let lease = loop {
        let status = read_status(&server.spool, "slow").unwrap();
        if status.as_ref().is_some_and(|s| s.phase == Phase::Steps) && marker.exists() {
            let text = server.spool.read("leases/slow").unwrap();
            break Lease::parse(&String::from_utf8(text).unwrap()).unwrap();
        }
        assert!(Instant::now() < deadline, "agent-1 never reached its step");
        std::thread::sleep(Duration::from_millis(100));
    };
    child.kill().unwrap();
    let _ = child.wait();
    release_leftovers(first.dir.path());

    // Nothing happens before the deadline; after it the master takes the job back.
    server.reap_until("the lease to be reaped", Duration::from_secs(60), |s| {
        let v = job_view(s, "slow", Timestamp::now()).unwrap();
        v.state == JobState::Queued && v.attempts == 1
    });

    let second = Agent::new("agent-2", &[&server]);
    let (code, out) = second.once();
    assert_eq!(code, 0, "{out}");

    // agent-1's late upload: the uploader itself stops, and a complete
    // upload planted under its token is refused by the master.
    let image = first.dir.path().join("late.raw.zst");
    std::fs::write(&image, b"late image").unwrap();
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: "slow".into(),
        job_blake3: String::new(),
        agent: "agent-1".into(),
        disk_size: 64 << 20,
        block_size: 4096,
        bytes_read: 0,
        image_size: 10,
        image_blake3: blake3::hash(b"late image").to_hex().to_string(),
        payloads: vec![],
        started: lease.acquired,
        finished: Timestamp::now(),
        phases: vec![],
        ranges: vec![],
        generalized: Vec::new(),
        provenance: None,
    };
    let e = upload(
        &server.spool,
        &lease,
        &image,
        &manifest,
        None,
        &UploadOptions { chunk_size: 4 },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.is_lease_lost(), "{e}");

    server.reap_until(
        "agent-2's image to be published",
        Duration::from_secs(30),
        |s| job_view(s, "slow", Timestamp::now()).unwrap().state == JobState::Done,
    );
    let history = read_history(&server.spool).unwrap();
    assert_eq!(history[0].agent, "agent-2");
    verify_published(&server.spool, "slow");
}

#[test]
fn a_failing_job_reports_its_reason_and_log() {
    if !can_run("a_failing_job_reports_its_reason_and_log") {
        return;
    }
    let server = server_with_base();
    server.add(
        "broken",
        500,
        "10m",
        "[[steps]]\nname = \"fail\"\nwhere = \"target\"\nrun = \"echo step-output-here; exit 7\"\n",
    );
    let agent = Agent::new("agent-1", &[&server]);
    let (code, out) = agent.once();
    assert_eq!(code, 1, "{out}");
    let status = read_status(&server.spool, "broken").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed);
    assert!(status.message.contains("fail"), "{status:?}");
    let log = String::from_utf8(server.spool.read("logs/broken.log").unwrap()).unwrap();
    assert!(log.contains("step-output-here"), "{log}");
    let report = reap(&server.spool, Timestamp::now()).unwrap();
    assert_eq!(report.released.len(), 1, "{report:?}");
    let v = job_view(&server.spool, "broken", Timestamp::now()).unwrap();
    assert_eq!((v.state, v.attempts), (JobState::Queued, 1));
    assert!(
        v.message.contains("agent-1 failed in steps"),
        "{}",
        v.message
    );
}

/// A SIGKILLed agent leaves its mounts and loop device behind; a real
/// machine would reboot. Clean them up so the test leaves nothing.
fn release_leftovers(dir: &Path) {
    let work: PathBuf = dir.join("work");
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
    if let Ok(out) = Command::new("losetup")
        .arg("-j")
        .arg(dir.join("disk.img"))
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(dev) = line.split(':').next() {
                let _ = Command::new("losetup").arg("-d").arg(dev).status();
            }
        }
    }
}

#[test]
fn an_upload_cut_by_an_sshd_restart_resumes() {
    if !can_run("an_upload_cut_by_an_sshd_restart_resumes") {
        return;
    }
    let mut server = server_with_base();
    // 48 MiB that does not compress: an image of about 48 one-MiB chunks.
    let big = server.dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut noise = vec![0u8; 48 << 20];
    blake3::Hasher::new()
        .update(b"kiln")
        .finalize_xof()
        .fill(&mut noise);
    std::fs::write(big.join("noise.bin"), &noise).unwrap();
    let tar = server.dir.path().join("payloads/big.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&big)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    server.add(
        "big",
        500,
        "10m",
        "[[payloads]]\nname = \"big.tar\"\ndest = \"/srv\"\n",
    );

    let agent = Agent::new("agent-1", &[&server]);
    let child = agent.command(true).stderr(Stdio::piped()).spawn().unwrap();
    // Cut the link as soon as the first chunk is whole on the server.
    let deadline = Instant::now() + Duration::from_secs(120);
    let incoming = server.dir.path().join("incoming/big");
    loop {
        let chunks = std::fs::read_dir(&incoming)
            .into_iter()
            .flatten()
            .flatten()
            .any(|tok| tok.path().join("chunk-00000000").exists());
        if chunks {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    server.sshd.kill();
    assert!(
        !server
            .spool
            .exists(&format!(
                "incoming/big/{}/manifest.toml",
                std::fs::read_dir(&incoming)
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
            ))
            .unwrap(),
        "the upload finished before the cut; the test did not cut anything"
    );
    server.sshd.restart().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");

    server.reap_until("big to be published", Duration::from_secs(60), |s| {
        job_view(s, "big", Timestamp::now()).unwrap().state == JobState::Done
    });
    verify_published(&server.spool, "big");
    let log = std::fs::read_to_string(server.spool.path("images/big/job.log")).unwrap();
    assert!(
        log.contains("upload interrupted"),
        "no cut in the job log:\n{log}"
    );
    // The stream went on where the server's chunks ended.
    assert!(
        log.contains("upload resumed at chunk"),
        "no resume in the job log:\n{log}"
    );
}

/// Writes `payloads/NAME` on the server: a tar of `size` bytes of noise
/// that does not compress, in one file.
fn noise_payload(server: &Server, name: &str, size: usize) {
    let src = server.dir.path().join(format!("{name}.src"));
    std::fs::create_dir_all(&src).unwrap();
    let mut noise = vec![0u8; size];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut noise);
    std::fs::write(src.join("noise.bin"), &noise).unwrap();
    let st = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(server.dir.path().join("payloads").join(name))
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

/// A 2 MiB tmpfs at `at`, unmounted on drop.
fn small_tmpfs(at: &Path) -> Mounted {
    std::fs::create_dir_all(at).unwrap();
    common::ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(at),
    );
    Mounted(at.to_path_buf())
}

/// Regular files under `dir`, by path relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else {
                out.push(
                    e.path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_payload_corrupted_on_the_server_fails_the_job_and_wipes_the_disk() {
    if !can_run("a_payload_corrupted_on_the_server_fails_the_job_and_wipes_the_disk") {
        return;
    }
    let server = server_with_base();
    noise_payload(&server, "noise.tar", 8 << 20);
    server.add(
        "corrupt",
        500,
        "10m",
        "[[payloads]]\nname = \"noise.tar\"\ndest = \"/srv\"\n",
    );
    // Pinned at add; then one byte of the file's data changes on the server.
    let on_server = server.dir.path().join("payloads/noise.tar");
    let mut bytes = std::fs::read(&on_server).unwrap();
    bytes[4 << 20] ^= 0xff;
    std::fs::write(&on_server, &bytes).unwrap();

    let agent = Agent::new("agent-1", &[&server]);
    // The agent's scratch space and TMPDIR hold 2 MiB: a payload staged
    // there on its way in would fail the job with "no space left" instead.
    let work = agent.dir.path().join("work");
    let _scratch = small_tmpfs(&work);
    let tmp = work.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = agent.command(true).env("TMPDIR", &tmp).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");

    let why = "payloads[1] \"noise.tar\": BLAKE3 ";
    assert!(err.contains(why), "{err}");
    assert!(err.contains("does not match the pinned"), "{err}");
    let status = read_status(&server.spool, "corrupt").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed, "{status:?}");
    assert_eq!(status.phase, Phase::Payloads, "{status:?}");
    assert!(status.message.contains(why), "{status:?}");
    let log = String::from_utf8(server.spool.read("logs/corrupt.log").unwrap()).unwrap();
    assert!(log.contains(why), "{log}");
    assert!(log.contains("wiped the partition table"), "{log}");
    assert!(
        common::table_wiped(&agent.dir.path().join("disk.img")),
        "the disk kept its partition table"
    );
    assert_eq!(files_under(&work), ["jobs/corrupt/job.log"]);
}
