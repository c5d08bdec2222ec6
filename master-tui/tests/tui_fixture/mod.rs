//! A spool with a job in every state, built with the protocol's own
//! functions at fixed times, so the console's panes render the same every run.

#![allow(dead_code)]

use std::path::Path;

use kiln_master::tui::{settle, App, Effect};
use kiln_spool::agent::claim::{claim_next, heartbeat};
use kiln_spool::lease::Lease;
use kiln_spool::manifest::{DataRange, Hardware, ImageManifest, Nic, PhaseTime, Provenance};
use kiln_spool::master::reap;
use kiln_spool::master::{add_job, cancel, init};
use kiln_spool::queue::read_job_list;
use kiln_spool::spool::{incoming_dir, job_path, log_path, payload_path, SIGNING_KEY};
use kiln_spool::status::{AgentState, Phase, Status};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{chunk_name, Chunk, ChunkList, CHUNKS, JOB_LOG, MANIFEST};
use kiln_spool::{LocalSpool, SpoolFs};

/// The master's image signing key, fixed so that fingerprints render the
/// same every run: SHA256:QgLCf0YaxmnCxz2e6GaclfOVDJA1YhlEqMVcGQxKuVs.
pub const SIGNING_KEY_TEXT: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACCeBxhRWySM3BWIqkO18POwEuzn3CMmnc9d51e4J5NcUQAAAJCcL78UnC+/
FAAAAAtzc2gtZWQyNTUxOQAAACCeBxhRWySM3BWIqkO18POwEuzn3CMmnc9d51e4J5NcUQ
AAAEBoNHviWhlsawH0q+BPOzcADw1QtVTWhzv7rDRiGtqgE54HGFFbJIzcFYiqQ7Xw87AS
7OfcIyadz13nV7gnk1xRAAAAC2tpbG4tbWFzdGVyAQI=
-----END OPENSSH PRIVATE KEY-----
";

/// 2027-01-15T08:00:00Z.
pub const T0: u64 = 1_800_000_000;
/// The time the console is looking at the fixture.
pub const NOW: Timestamp = Timestamp(T0 + 1200);

pub fn at(secs: u64) -> Timestamp {
    Timestamp(T0 + secs)
}

/// A valid job file: an ESP and a root filesystem, the base payload, one step.
pub fn job_text(id: &str, priority: u32, time_limit: &str, max_attempts: u32) -> String {
    format!(
        r#"id = "{id}"
priority = {priority}
time_limit = "{time_limit}"
max_attempts = {max_attempts}
description = "{id} image for the lab"

[disk]
table = "gpt"

[[disk.partitions]]
label = "esp"
size = "512MiB"
kind = "esp"
fs = "vfat"
mount = "/boot/efi"

[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"

[[payloads]]
name = "base.tar"

[[steps]]
name = "enable-ssh"
run = "systemctl enable ssh"
"#
    )
}

fn add(spool: &LocalSpool, id: &str, priority: u32, limit: &str, attempts: u32, t: u64) {
    let text = job_text(id, priority, limit, attempts);
    add_job(spool, &text, Path::new(&format!("{id}.toml")), at(t))
        .unwrap_or_else(|e| panic!("adding {id}: {e}"));
}

fn claim(spool: &LocalSpool, agent: &str, t: u64) -> Lease {
    claim_next(spool, agent, at(t))
        .expect("claiming")
        .expect("a job to claim")
}

/// A pass of the master's at `t`: a lease's time counts from the pass that
/// first sees it.
fn seen(spool: &LocalSpool, t: u64) {
    reap(spool, at(t)).expect("a reap pass");
}

#[allow(clippy::too_many_arguments)]
fn beat(
    spool: &LocalSpool,
    lease: &Lease,
    server: &str,
    state: AgentState,
    phase: Phase,
    progress: f32,
    message: &str,
    updated: u64,
) {
    beat_bytes(
        spool,
        lease,
        server,
        state,
        phase,
        progress,
        (0, 0),
        message,
        updated,
    );
}

/// A heartbeat that counts `bytes`, done and in all, of its phase.
#[allow(clippy::too_many_arguments)]
fn beat_bytes(
    spool: &LocalSpool,
    lease: &Lease,
    server: &str,
    state: AgentState,
    phase: Phase,
    progress: f32,
    bytes: (u64, u64),
    message: &str,
    updated: u64,
) {
    let status = Status {
        job: lease.job.clone(),
        agent: lease.agent.clone(),
        token: lease.token.clone(),
        server: server.into(),
        state,
        phase,
        progress,
        bytes_done: bytes.0,
        bytes_total: bytes.1,
        message: message.into(),
        started: lease.acquired,
        updated: at(updated),
    };
    heartbeat(spool, lease, &status).expect("writing a heartbeat");
}

/// Uploads a complete image for `lease` the way an agent does: chunks, the
/// chunk list, the job log, then the manifest last.
fn upload(spool: &LocalSpool, lease: &Lease) {
    let image: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let dir = incoming_dir(&lease.job, &lease.token);
    spool.mkdir_all(&dir).unwrap();
    let chunk_size = 16_384;
    let mut chunks = Vec::new();
    for (i, piece) in image.chunks(chunk_size).enumerate() {
        spool
            .write_atomic(&format!("{dir}/{}", chunk_name(i)), piece)
            .unwrap();
        chunks.push(Chunk {
            size: piece.len() as u64,
            blake3: blake3::hash(piece).to_hex().to_string(),
        });
    }
    let list = ChunkList {
        chunk_size: chunk_size as u64,
        total_size: image.len() as u64,
        chunks,
    };
    spool
        .write_atomic(&format!("{dir}/{CHUNKS}"), list.to_toml().as_bytes())
        .unwrap();
    spool
        .write_atomic(
            &format!("{dir}/{JOB_LOG}"),
            b"check: disk /dev/vda 8 GiB\npartition: gpt, 2 partitions\nmkfs: vfat, ext4\npayloads: base.tar\ncapture: 4 MiB of data\nupload: 3 chunks\n",
        )
        .unwrap();
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: lease.job.clone(),
        job_blake3: read_job_list(spool)
            .unwrap()
            .get(&lease.job)
            .expect("the job is listed")
            .blake3
            .clone(),
        agent: lease.agent.clone(),
        disk_size: 8 << 30,
        block_size: 4096,
        bytes_read: 4 << 20,
        image_size: image.len() as u64,
        image_blake3: blake3::hash(&image).to_hex().to_string(),
        payloads: vec![],
        started: lease.acquired,
        finished: at(380),
        phases: ["partition", "payloads", "steps", "capture"]
            .iter()
            .zip([4.0, 61.5, 12.25, 140.0])
            .scan(lease.acquired.0, |t, (name, seconds)| {
                let started = *t;
                *t += seconds as u64;
                Some(PhaseTime {
                    name: name.to_string(),
                    seconds,
                    started: Some(Timestamp(started)),
                })
            })
            .collect(),
        ranges: vec![
            DataRange {
                offset: 0,
                length: 1 << 20,
                blake3: "0".repeat(64),
            },
            DataRange {
                offset: 512 << 20,
                length: 3 << 20,
                blake3: "1".repeat(64),
            },
        ],
        generalized: Vec::new(),
        provenance: Some(Provenance {
            kiln_version: "0.4.0".into(),
            hardware: Hardware {
                vendor: "Dell Inc.".into(),
                product: "OptiPlex 7090".into(),
                cpu_model: "Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz".into(),
                cpus: 16,
                memory_bytes: 32 << 30,
                disk_model: "Samsung SSD 980 1TB".into(),
                disk_size: 1_000_204_886_016,
                nics: vec![Nic {
                    name: "eno1".into(),
                    mac: "d8:9e:f3:1a:2b:3c".into(),
                }],
            },
            ..Provenance::default()
        }),
    };
    spool
        .write_atomic(&format!("{dir}/{MANIFEST}"), manifest.to_toml().as_bytes())
        .unwrap();
}

/// Builds the spool in `root`:
///
/// | job       | state     | how                                       |
/// |-----------|-----------|-------------------------------------------|
/// | db-02     | queued    | priority 700                              |
/// | build-04  | leased    | agent-a, 60 s left at NOW, has a log      |
/// | upload-05 | uploading | agent-b, whose heartbeat is stale         |
/// | web-01    | queued    | priority 500                              |
/// | cache-03  | queued    | priority 300                              |
/// | done-06   | done      | agent-c uploaded, the reaper published it |
/// | failed-08 | failed    | agent-d failed in partition, 1 attempt    |
/// | bad-07    | invalid   | dropped in jobs/ with priority 5000       |
/// | cancel-09 | cancelled | cancelled while queued                    |
pub fn build(root: &Path) -> LocalSpool {
    let spool = LocalSpool::new(root);
    init(&spool).unwrap();
    assert!(spool
        .create_private(SIGNING_KEY, SIGNING_KEY_TEXT.as_bytes())
        .unwrap());
    spool
        .write_atomic(&payload_path("base.tar"), b"a base system archive")
        .unwrap();

    add(&spool, "build-04", 600, "20m", 3, 0);
    let a = claim(&spool, "agent-a", 60);
    seen(&spool, 60);
    beat_bytes(
        &spool,
        &a,
        "10.0.0.1:22",
        AgentState::Building,
        Phase::Payloads,
        0.4,
        (292 << 20, 731 << 20),
        "",
        1170,
    );
    spool
        .write_atomic(
            &log_path("build-04"),
            b"check: disk /dev/sda 16 GiB\npartition: gpt, 2 partitions\nmkfs: vfat on esp\nmkfs: ext4 on root\npayloads: base.tar 40%\n",
        )
        .unwrap();

    add(&spool, "upload-05", 600, "1h", 3, 120);
    let b = claim(&spool, "agent-b", 180);
    seen(&spool, 180);
    beat(
        &spool,
        &b,
        "10.0.0.1:22",
        AgentState::Uploading,
        Phase::Upload,
        0.7,
        "",
        1000,
    );

    add(&spool, "done-06", 600, "1h", 3, 240);
    let c = claim(&spool, "agent-c", 250);
    upload(&spool, &c);
    beat(
        &spool,
        &c,
        "10.0.0.2:22",
        AgentState::Uploaded,
        Phase::Upload,
        1.0,
        "",
        390,
    );

    add(&spool, "failed-08", 400, "1h", 1, 300);
    let d = claim(&spool, "agent-d", 310);
    beat(
        &spool,
        &d,
        "10.0.0.2:22",
        AgentState::Failed,
        Phase::Partition,
        0.0,
        "sfdisk exited with status 1",
        330,
    );

    let bad = job_text("bad-07", 5000, "1h", 3);
    spool
        .write_atomic(&job_path("bad-07"), bad.as_bytes())
        .unwrap();

    let report = reap(&spool, at(400)).unwrap();
    assert_eq!(report.published, ["done-06"], "{report:?}");

    add(&spool, "web-01", 500, "1h", 3, 500);
    add(&spool, "db-02", 700, "1h", 3, 510);
    add(&spool, "cache-03", 300, "1h", 3, 520);
    add(&spool, "cancel-09", 500, "1h", 3, 530);
    cancel(&spool, "cancel-09", at(540)).unwrap();
    spool
}

/// A console on the fixture at [`NOW`], read once, with a fixed spool label
/// and colour on whatever the environment says.
pub fn console(root: &Path) -> App {
    let mut app = App::new(root, NOW);
    app.spool_label = "/srv/kiln/spool".into();
    app.color = true;
    settle(&mut app, vec![Effect::Refresh]);
    app
}

/// An agent id as a hostile agent writes it: a window title and a C1 CSI
/// that clears the screen.
pub const EVIL_AGENT: &str = "evil\x1b]0;pwned\x07\u{9b}2J";
/// Text that clears the screen and returns the cursor (a status's phase
/// cannot carry it: the phase is one of the job's phases or the status is
/// set aside).
pub const EVIL_PHASE: &str = "\x1b[2Jpayloads\r";
/// A message that writes the clipboard (OSC 52) and reverses what follows.
pub const EVIL_MESSAGE: &str = "\x1b]52;c;cm0gLXJmIH4=\x07copied\u{202e}gnp.exe\x08\x08";
/// A server that paints the line red and backs over it.
pub const EVIL_SERVER: &str = "\x1b[31m10.0.0.9:22\x08\x08\u{2066}";
/// A job log with colours, a title, a clipboard write, CR, C1 CSI and a tab.
pub const EVIL_LOG: &str = "\x1b[1;31merror\x1b[0m: disk\n\x1b]0;pwned\x07title gone\n\x1b]52;c;cm0=\x07clip\rover\n\u{9b}2Jcleared\n\tindented \u{202e}reversed\n";

/// Adds to a [`build`] spool three jobs whose agent writes hostile strings
/// everywhere it can: its id (in the lease), its status's message and
/// server, and its job log.
///
/// | job     | state    | how                                          |
/// |---------|----------|----------------------------------------------|
/// | evil-11 | leased   | building, hostile heartbeat and log          |
/// | evil-12 | done     | uploaded and published under the hostile id  |
/// | evil-13 | failed   | its agent failed with a hostile message      |
pub fn add_hostile(spool: &LocalSpool) {
    add(spool, "evil-11", 950, "1h", 3, 600);
    let a = claim(spool, EVIL_AGENT, 610);
    seen(spool, 610);
    beat(
        spool,
        &a,
        EVIL_SERVER,
        AgentState::Building,
        Phase::Payloads,
        0.3,
        EVIL_MESSAGE,
        1190,
    );
    spool
        .write_atomic(&log_path("evil-11"), EVIL_LOG.as_bytes())
        .unwrap();

    add(spool, "evil-12", 940, "1h", 3, 620);
    let b = claim(spool, EVIL_AGENT, 630);
    upload(spool, &b);
    beat(
        spool,
        &b,
        EVIL_SERVER,
        AgentState::Uploaded,
        Phase::Payloads,
        1.0,
        EVIL_MESSAGE,
        640,
    );

    add(spool, "evil-13", 930, "1h", 1, 650);
    let c = claim(spool, EVIL_AGENT, 660);
    beat(
        spool,
        &c,
        EVIL_SERVER,
        AgentState::Failed,
        Phase::Payloads,
        0.0,
        EVIL_MESSAGE,
        670,
    );
    // Publishes evil-12 and fails evil-13, unless the reaper refuses them.
    reap(spool, at(700)).expect("a reap pass never fails on agent input");
}
