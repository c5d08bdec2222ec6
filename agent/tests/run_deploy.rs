//! Deploy jobs in `kiln-agent run`, against OpenSSH's sshd on 127.0.0.1:
//! an image built by an agent and published and signed by the master goes
//! onto a larger disk, range for range, and the master records which
//! machine got it; an image signed by a key the agent does not know, or an
//! agent with no `image_signers`, writes nothing and fails the job saying why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::sshd::skip_without_sshd;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::master::{self, job_view, read_history, JobState};
use kiln_spool::signature::SigningKey;
use kiln_spool::status::{read_status, AgentState, Phase};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{DeployReport, Published};

use common::server::Server;
use common::{ok, sfdisk_json, Loop, AGENT};

const MIB: u64 = 1 << 20;

/// One agent: its config, disk image file and scratch directory.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(id: &str, server: &Server, signers: &[String], disk_size: u64) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = format!("id = \"{id}\"\npoll_interval = \"1s\"\n");
        if !signers.is_empty() {
            let lines: Vec<String> = signers.iter().map(|l| format!("'{l}'")).collect();
            cfg.push_str(&format!("image_signers = [{}]\n", lines.join(", ")));
        }
        cfg.push_str(&server.config_block());
        std::fs::write(dir.path().join("agent.toml"), cfg).unwrap();
        let disk = std::fs::File::create(dir.path().join("disk.img")).unwrap();
        disk.set_len(disk_size).unwrap();
        Agent { dir }
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// [`Agent::once`], with every state and phase the job's status file
    /// showed while the agent ran.
    fn once_watching(&self, server: &Server, job: &str) -> (i32, String, Vec<(AgentState, Phase)>) {
        let mut child = self
            .command()
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        let code = loop {
            if let Ok(Some(st)) = read_status(&server.spool, job) {
                if seen.last() != Some(&(st.state, st.phase)) {
                    seen.push((st.state, st.phase));
                }
            }
            if let Some(code) = child.try_wait().unwrap() {
                break code.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the agent did not finish {job}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (code, err, seen)
    }

    fn command(&self) -> Command {
        self.command_on(&self.disk())
    }

    /// `kiln-agent run --once` with `disk` as the agent's disk.
    fn command_on(&self, disk: &Path) -> Command {
        let mut c = Command::new(AGENT);
        c.arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("--disk")
            .arg(disk)
            .arg("--work-dir")
            .arg(self.dir.path().join("work"))
            .args(["--chunk-size", "1MiB", "--once"]);
        c
    }

    fn once(&self) -> (i32, String) {
        let out = self.command().output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn can_run(test: &str) -> bool {
    assert!(
        common::can_run(test),
        "{test} cannot run here: the line above says why"
    );
    !skip_without_sshd()
}

fn build_job(id: &str) -> String {
    format!(
        "id = \"{id}\"\ntime_limit = \"10m\"\nmax_attempts = 1\n\
         [disk]\n[[disk.partitions]]\nlabel = \"bios\"\nsize = \"1MiB\"\nkind = \"bios-boot\"\nfs = \"none\"\n\
         [[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\
         [[payloads]]\nname = \"base.tar\"\n[configure]\nhostname = \"{id}\"\n"
    )
}

fn deploy_job(id: &str, image: &str, grow: bool, reboot: bool) -> String {
    format!(
        "id = \"{id}\"\nkind = \"deploy\"\ntime_limit = \"10m\"\nmax_attempts = 1\n\
         [disk]\ndevice = \"auto\"\n[deploy]\nimage = \"{image}\"\ngrow = {grow}\nreboot = {reboot}\n"
    )
}

/// A small payload: one file and a directory.
fn add_payload(server: &Server) {
    let root = server.dir.path().join("payload-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "NAME=kiln-deploy-test\n").unwrap();
    ok(Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(server.dir.path().join("payloads/base.tar"))
        .arg("."));
}

/// Every data range of `manifest` reads back from `disk` with its BLAKE3.
fn ranges_match(disk: &Path, manifest: &ImageManifest) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    for (i, r) in manifest.ranges.iter().enumerate() {
        let mut buf = vec![0u8; r.length as usize];
        f.read_exact_at(&mut buf, r.offset).unwrap();
        let got = blake3::hash(&buf).to_hex().to_string();
        if got != r.blake3 {
            return Err(format!(
                "range {i} at {} ({} bytes): {got}, the manifest says {}",
                r.offset, r.length, r.blake3
            ));
        }
    }
    Ok(())
}

fn read_manifest(path: &Path) -> ImageManifest {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ImageManifest::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A run build's manifest carries the agent's provenance; the master
/// publishes and signs it; a deploy job writes it onto a disk twice the
/// size, every range as the manifest says, then again grown to fill the
/// disk; `deployed.toml` says so and the master records it.
#[test]
fn a_published_image_is_deployed_onto_a_larger_disk_and_recorded() {
    if !can_run("a_published_image_is_deployed_onto_a_larger_disk_and_recorded") {
        return;
    }
    let server = Server::start();
    add_payload(&server);
    server.add_job(&build_job("web"));
    let builder = Agent::new("builder", &server, &[], 128 * MIB);
    let (code, out) = builder.once();
    assert_eq!(code, 0, "{out}\n{}", server.sshd.log_tail());

    // The uploaded manifest, before the master adds its part.
    let uploaded = read_manifest(&server.upload_dir("web").join("manifest.toml"));
    common::assert_run_provenance(&uploaded, 128 * MIB);
    let p = uploaded.provenance.as_ref().unwrap();
    assert!(p.job_text.is_empty() && p.signer.is_empty() && p.published.is_none());
    let tar = std::fs::read(server.dir.path().join("payloads/base.tar")).unwrap();
    assert_eq!(uploaded.payloads.len(), 1);
    assert_eq!(uploaded.payloads[0].name, "base.tar");
    assert_eq!(uploaded.payloads[0].blake3, common::blake3_hex(&tar));

    server.reap_until("web to be published", Duration::from_secs(60), |s| {
        job_view(s, "web", Timestamp::now()).unwrap().state == JobState::Done
    });
    let image_dir = server.spool.path("images/web");
    assert!(image_dir.join("manifest.toml.sig").exists());
    let published = read_manifest(&image_dir.join("manifest.toml"));
    let manifest_blake3 =
        common::blake3_hex(&std::fs::read(image_dir.join("manifest.toml")).unwrap());

    // The deploy: no grow, so every range reads back as published.
    let target = Agent::new("target-1", &server, &[server.signer_line()], 256 * MIB);
    server.add_job(&deploy_job("deploy-web", "web", false, true));
    let (code, out, seen) = target.once_watching(&server, "deploy-web");
    assert_eq!(code, 0, "{out}\n{}", server.sshd.log_tail());
    assert!(
        seen.iter()
            .all(|(st, _)| matches!(st, AgentState::Deploying | AgentState::Deployed)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(st, _)| *st == AgentState::Deploying),
        "{seen:?}"
    );
    assert!(out.contains("is signed by"), "{out}");
    assert!(out.contains("not the machine's init"), "{out}");
    let dir = server.upload_dir("deploy-web");
    let text = std::fs::read_to_string(dir.join("deployed.toml")).expect("deployed.toml");
    let r = DeployReport::parse(&text).unwrap();
    assert_eq!(r.job, "deploy-web");
    assert_eq!(r.image, "web");
    assert_eq!(r.manifest_blake3, manifest_blake3);
    assert_eq!(r.image_blake3, published.image_blake3);
    assert_eq!(r.agent, "target-1");
    assert_eq!(r.disk, target.disk().display().to_string());
    assert_eq!(r.disk_size, 256 * MIB);
    assert!(!r.grown);
    assert_eq!(r.bytes_written, published.data_bytes());
    assert!(r.started <= r.finished);
    for ph in &r.phases {
        let started = ph
            .started
            .unwrap_or_else(|| panic!("{} has no start", ph.name));
        assert!(r.started <= started && started <= r.finished, "{ph:?}");
    }
    let phases: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    for want in ["download", "check", "deploy", "readback"] {
        assert!(phases.contains(&want), "no {want} phase in {phases:?}");
    }
    assert!(r.hardware.cpus > 0 && r.hardware.memory_bytes > 0, "{r:?}");
    let log = std::fs::read_to_string(dir.join("job.log")).expect("the job log");
    assert!(log.contains("is signed by"), "{log}");
    ranges_match(&target.disk(), &published).unwrap();
    let status = read_status(&server.spool, "deploy-web").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Deployed, "{status:?}");

    server.reap_until("the deploy to be recorded", Duration::from_secs(60), |s| {
        job_view(s, "deploy-web", Timestamp::now()).unwrap().state == JobState::Done
    });
    let history = read_history(&server.spool).unwrap();
    let rec = history
        .iter()
        .find(|h| h.entry.id == "deploy-web")
        .expect("the deploy in history");
    assert_eq!(
        rec.deployment.as_ref().map(|d| d.agent.as_str()),
        Some("target-1")
    );

    // Again with grow, onto the same disk as a block device: the last
    // partition now ends at the disk's end.
    server.add_job(&deploy_job("deploy-web-grown", "web", true, false));
    let lo = Loop::new(&target.disk(), 0, None);
    let out = target.command_on(Path::new(&lo.0)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    drop(lo);
    let dir = server.upload_dir("deploy-web-grown");
    let r =
        DeployReport::parse(&std::fs::read_to_string(dir.join("deployed.toml")).unwrap()).unwrap();
    assert!(r.grown, "{r:?}");
    assert!(r.disk.starts_with("/dev/loop"), "{r:?}");
    assert_eq!((r.disk_size, r.hardware.disk_size), (256 * MIB, 256 * MIB));
    let table = sfdisk_json(&target.disk()).expect("a partition table");
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let last = parts.last().unwrap();
    let end = (last["start"].as_u64().unwrap() + last["size"].as_u64().unwrap()) * 512;
    assert!(
        end > 250 * MIB && end <= 256 * MIB,
        "the last partition ends at {end}: {table}"
    );
    let root = Loop::new(
        &target.disk(),
        last["start"].as_u64().unwrap() * 512,
        Some(last["size"].as_u64().unwrap() * 512),
    );
    ok(Command::new("e2fsck").args(["-fn", &root.0]));
    let dumped = ok(Command::new("dumpe2fs").args(["-h", &root.0]));
    let field = |name: &str| -> u64 {
        dumped
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {dumped}"))
    };
    let fs_bytes = field("Block count:") * field("Block size:");
    assert!(
        fs_bytes > 248 * MIB,
        "the root filesystem is {fs_bytes} bytes"
    );
}

/// A published image of `id`, captured from a small GPT + ext4 disk and
/// signed with `key`, put into the spool as the master would.
fn publish_by_hand(server: &Server, id: &str, key: &SigningKey) -> ImageManifest {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("src.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, type=L\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let table = sfdisk_json(&disk).unwrap();
    let part = &table["partitiontable"]["partitions"][0];
    let (start, size) = (
        part["start"].as_u64().unwrap() * 512,
        part["size"].as_u64().unwrap() * 512,
    );
    {
        let lo = Loop::new(&disk, start, Some(size));
        ok(Command::new("mke2fs").args(["-q", "-t", "ext4", "-L", "root", &lo.0]));
    }
    let out = work.path().join("img.raw.zst");
    ok(Command::new(AGENT)
        .arg("capture")
        .arg("--disk")
        .arg(&disk)
        .arg("--out")
        .arg(&out));
    let mut m = read_manifest(&work.path().join("img.manifest.toml"));
    m.job = id.to_string();
    let text = m.to_toml();
    let dir = server.spool.path(&format!("images/{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&out, dir.join("image.raw.zst")).unwrap();
    std::fs::write(dir.join("manifest.toml"), &text).unwrap();
    std::fs::write(
        dir.join("manifest.toml.sig"),
        key.sign(text.as_bytes()).unwrap(),
    )
    .unwrap();
    let published = Published {
        job: id.to_string(),
        token: "1-00".into(),
        agent: "by-hand".into(),
        published: Timestamp::now(),
        image_size: m.image_size,
        image_blake3: m.image_blake3.clone(),
        disk_size: m.disk_size,
    };
    std::fs::write(dir.join("published.toml"), published.to_toml()).unwrap();
    m
}

/// A disk file full of a pattern, and its BLAKE3, to show nothing was written.
fn patterned(agent: &Agent) -> String {
    let data: Vec<u8> = (0..agent.disk().metadata().unwrap().len())
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(agent.disk(), &data).unwrap();
    common::blake3_hex(&data)
}

fn disk_hash(agent: &Agent) -> String {
    common::blake3_hex(&std::fs::read(agent.disk()).unwrap())
}

#[test]
fn an_image_signed_by_an_unknown_key_is_not_written() {
    if !can_run("an_image_signed_by_an_unknown_key_is_not_written") {
        return;
    }
    let server = Server::start();
    let stranger = SigningKey::generate("stranger").unwrap();
    publish_by_hand(&server, "img", &stranger);
    server.add_job(&deploy_job("deploy-img", "img", true, false));
    let agent = Agent::new("target-1", &server, &[server.signer_line()], 128 * MIB);
    let before = patterned(&agent);
    let (code, out) = agent.once();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("manifest.toml.sig"), "{out}");
    assert!(out.contains("signature"), "{out}");
    assert_eq!(disk_hash(&agent), before, "the disk was written");
    let status = read_status(&server.spool, "deploy-img").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed, "{status:?}");
    assert!(status.message.contains("signature"), "{status:?}");
    let upload = server.upload_dir("deploy-img");
    assert!(!upload.join("deployed.toml").exists());
}

#[test]
fn an_agent_without_image_signers_refuses_deploy_jobs() {
    if !can_run("an_agent_without_image_signers_refuses_deploy_jobs") {
        return;
    }
    let server = Server::start();
    let key = master::signing::load_or_create_key(&server.spool)
        .unwrap()
        .0;
    publish_by_hand(&server, "img", &key);
    server.add_job(&deploy_job("deploy-img", "img", true, false));
    let agent = Agent::new("target-1", &server, &[], 128 * MIB);
    let before = patterned(&agent);
    let (code, out) = agent.once();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no image_signers"), "{out}");
    assert_eq!(disk_hash(&agent), before, "the disk was written");
    let status = read_status(&server.spool, "deploy-img").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed, "{status:?}");
    assert!(
        status.message.contains("refused") && status.message.contains("image_signers"),
        "{status:?}"
    );

    // The same image deploys once the agent trusts the master's key.
    server.reap_until("the refused job to end", Duration::from_secs(60), |s| {
        job_view(s, "deploy-img", Timestamp::now()).unwrap().state != JobState::Queued
    });
    server.add_job(&deploy_job("deploy-img-2", "img", false, false));
    let trusting = Agent::new(
        "target-2",
        &server,
        &[key.allowed_signers_line("kiln-master")],
        128 * MIB,
    );
    let (code, out) = trusting.once();
    assert_eq!(code, 0, "{out}");
    let m = read_manifest(&server.spool.path("images/img/manifest.toml"));
    ranges_match(&trusting.disk(), &m).unwrap();
}

/// The job server is hostile input too: a manifest published again (and
/// signed) after the job pinned the first one is refused before the disk
/// is touched; an image file changed under its signed manifest streams
/// until the range it breaks, which stops the deploy, named, with the
/// partition table wiped.
#[test]
fn a_republished_manifest_is_refused_untouched_and_a_corrupted_range_stops_the_deploy_named() {
    if !can_run(
        "a_republished_manifest_is_refused_untouched_and_a_corrupted_range_stops_the_deploy_named",
    ) {
        return;
    }
    let server = Server::start();
    let key = master::signing::load_or_create_key(&server.spool)
        .unwrap()
        .0;
    publish_by_hand(&server, "img", &key);
    let agent = Agent::new(
        "target-1",
        &server,
        &[key.allowed_signers_line("kiln-master")],
        128 * MIB,
    );
    let before = patterned(&agent);

    // The job pins this publication; then the manifest changes, signed anew.
    server.add_job(&deploy_job("pinned", "img", true, false));
    let dir = server.spool.path("images/img");
    let original = std::fs::read(dir.join("manifest.toml")).unwrap();
    let mut changed = original.clone();
    changed.extend_from_slice(b"# published again\n");
    std::fs::write(dir.join("manifest.toml"), &changed).unwrap();
    std::fs::write(dir.join("manifest.toml.sig"), key.sign(&changed).unwrap()).unwrap();
    let (code, out) = agent.once();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("deploy.manifest_blake3"), "{out}");
    assert_eq!(disk_hash(&agent), before, "the disk was written");
    let status = read_status(&server.spool, "pinned").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed, "{status:?}");
    assert!(
        status.message.contains("images/img/manifest.toml"),
        "{status:?}"
    );
    server.reap_until("the pinned job to end", Duration::from_secs(60), |s| {
        job_view(s, "pinned", Timestamp::now()).unwrap().state != JobState::Queued
    });

    // The manifest as published, but one byte of the image flipped.
    std::fs::write(dir.join("manifest.toml"), &original).unwrap();
    std::fs::write(dir.join("manifest.toml.sig"), key.sign(&original).unwrap()).unwrap();
    let image = dir.join("image.raw.zst");
    let mut bytes = std::fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    server.add_job(&deploy_job("flipped", "img", true, false));
    let (code, out) = agent.once();
    assert_eq!(code, 1, "{out}");
    // The image streams onto the disk once: the range it breaks (one that
    // no longer hashes right, or that no longer decompresses) stops the
    // write, named, and the partition table is wiped.
    assert!(
        out.contains("range ")
            && (out.contains("the signed manifest says") || out.contains("decompressing")),
        "the failed range is not named: {out}"
    );
    assert!(
        out.contains("wiping the partition table"),
        "the table is not wiped: {out}"
    );
    assert_ne!(disk_hash(&agent), before, "the deploy did not start");
    assert!(
        common::table_wiped(&agent.disk()),
        "a partition table is left on the disk"
    );
    let status = read_status(&server.spool, "flipped").unwrap().unwrap();
    assert_eq!(status.state, AgentState::Failed, "{status:?}");
    assert!(!server.upload_dir("flipped").join("deployed.toml").exists());
}
