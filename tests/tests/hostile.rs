//! The hostile agent. Whoever can fetch the initramfs holds the agent key;
//! this is what such a holder can try, against sshd set up exactly as
//! `kiln-master init --agent-user` and `kiln-master agent-key` set it up,
//! with the real `kiln-master` binary as the master.
//!
//! Each attack in [`ATTACKS`] is either refused by sshd ([`How::Refused`]:
//! the request fails and the master's files are unchanged right after) or
//! planted for the master to neutralize ([`How::Planted`]: sshd lets it
//! through, and after `kiln-master reap` nothing outside the spool is
//! touched, no wrong image is published and the pass goes on). Meanwhile
//! a good job is claimed and uploaded with the agent's own functions, and
//! must be published with its BLAKE3 intact. Adding an attack is one entry.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::fake_image::{file_blake3, random_image};
use kiln_e2e::job_server::{master_command, JobServer, BASE};
use kiln_e2e::raw_sftp::{RawSftp, Reply, CREAT, EXCL, READ, TRUNC, WRITE};
use kiln_e2e::wait::wait_until;
use kiln_spool::agent::claim::claim_next;
use kiln_spool::agent::uploader::{upload, UploadOptions};
use kiln_spool::lease::Lease;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::queue::{read_job_list, Entry, JobList};
use kiln_spool::sftp::{SessionOptions, SftpSpool, SshSession};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{chunk_name, Chunk, ChunkList, Published, CHUNKS, IMAGE_FILE, MANIFEST};
use kiln_spool::{LocalSpool, SpoolFs};

#[path = "hostile/observe.rs"]
mod observe;
#[path = "hostile/planted.rs"]
mod planted;
#[path = "hostile/refused.rs"]
mod refused;

use observe::*;
use planted::*;
use refused::*;

/// The spool as agents name it.
const S: &str = "/spool";

/// `path` in the spool, as agents name it.
fn sp(path: &str) -> String {
    format!("{S}/{path}")
}
/// Size of the huge agent-written files: sparse, so cheap to make, but far
/// more than any record the master should read.
const HUGE: u64 = 1 << 30;
/// The most memory a master command may use with those files around.
const MAX_RSS_KIB: i64 = 256 << 10;
/// The longest a master command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What an attack's action or check found: `Err` says how it was not held.
type Held = Result<(), String>;

/// How an attack is tried and judged.
enum How {
    /// sshd must refuse it: `action` is `Err` when a request went
    /// through, and the master's files must be unchanged right after.
    Refused {
        action: fn(&mut Ctx) -> Held,
        check: fn(&mut Ctx) -> Held,
    },
    /// sshd lets it in (agents must write there); `action` plants it, on
    /// `job`, and `check` judges what the master's passes made of it.
    Planted {
        job: &'static str,
        action: fn(&mut Ctx, &str) -> Held,
        check: fn(&mut Ctx, &str) -> Held,
    },
}

struct Attack {
    name: &'static str,
    how: How,
}

const fn refused(
    name: &'static str,
    action: fn(&mut Ctx) -> Held,
    check: fn(&mut Ctx) -> Held,
) -> Attack {
    Attack {
        name,
        how: How::Refused { action, check },
    }
}

const fn planted(
    name: &'static str,
    job: &'static str,
    action: fn(&mut Ctx, &str) -> Held,
    check: fn(&mut Ctx, &str) -> Held,
) -> Attack {
    Attack {
        name,
        how: How::Planted { job, action, check },
    }
}

fn nothing_more(_: &mut Ctx) -> Held {
    Ok(())
}

#[rustfmt::skip]
const ATTACKS: &[Attack] = &[
    // The master's files.
    refused("overwrite jobs.toml", overwrite_job_list, nothing_more),
    refused("replace jobs.toml by a rename", replace_job_list, nothing_more),
    refused("rename or delete jobs.toml", remove_job_list, nothing_more),
    refused("rewrite jobs/<id>.toml", rewrite_job_file, nothing_more),
    refused("rename or delete jobs/<id>.toml", remove_job_file, nothing_more),
    refused("add jobs/evil.toml with an agent step", add_evil_job, nothing_more),
    refused("overwrite, rename or delete a payload", tamper_payload, nothing_more),
    refused("add a payload", add_payload, nothing_more),
    refused("list images/", list_images, nothing_more),
    refused("write into images/", write_images, nothing_more),
    refused("plant images/<id>/published.toml", plant_publication, nothing_more),
    refused("list, read or write history/", touch_history, nothing_more),
    refused("list or read master/", read_master_dir, nothing_more),
    refused("delete or replace the masters' lock", remove_master_lock, nothing_more),
    refused("remove or rename the spool's directories", remove_spool_dirs, nothing_more),
    refused("make entries beside the spool's", make_top_level_entries, nothing_more),
    refused("remove or replace a lease the master wrote", remove_master_lease, master_lease_intact),
    // Links, attributes, copies.
    refused("symlinks anywhere", make_symlinks, no_links_left),
    refused("hard links anywhere", make_hard_links, no_links_left),
    refused("chmod, chown or touch (setstat, fsetstat, lsetstat)", change_attributes, nothing_more),
    refused("server-side copy (copy-data)", copy_data, nothing_more),
    // Beyond SFTP.
    refused("exec a shell command", exec_command, no_exec_marker),
    refused("ask for a shell or a tty", ask_for_shell, nothing_more),
    refused("forward ports", forward_ports, nothing_more),
    // Out of the spool by path.
    refused("read ../../etc/passwd and friends", read_by_traversal, nothing_more),
    refused("write ../../ anything", write_by_traversal, nothing_outside_written),
    // What sshd lets in and the master must neutralize.
    planted("lease job = \"X/../../..\" with incoming/X", "trav", lease_job_climbs_to_chroot, lease_set_aside),
    planted("lease job climbing out of the chroot", "travout", lease_job_climbs_out, lease_set_aside),
    planted("lease job = \"../jobs.toml\"", "listjob", lease_job_is_job_list, lease_set_aside),
    planted("lease for job A filed as B", "named", lease_for_another_job, other_jobs_lease_stands),
    planted("lease token climbing out", "tokjob", lease_token_climbs_out, lease_set_aside),
    planted("lease with attempt = u32::MAX", "bigattempt", lease_attempt_max, attempts_stay_sane),
    planted("deadline 9999-12-31 and attempt 0", "short", lease_forever, reaped_by_the_masters_clock),
    planted("stray files and directories in agents' areas", "", plant_strays, strays_gone_and_passes_go_on),
    planted("a huge status file", "huge", huge_status, master_stays_small),
    planted("a huge lease file", "hugelease", huge_lease, master_stays_small),
    planted("escapes in agent, server and message", "escapes", escapes_in_status, output_has_no_controls),
    planted("escapes in the phase", "escphase", escapes_in_phase, output_has_no_controls),
    planted("a non-UTF-8 lease", "nonutf8", lease_not_utf8, lease_set_aside),
    planted("a malformed lease", "malformed", lease_malformed, lease_set_aside),
    planted("an upload whose image fails its hash, with a forged publication record", "forged", forged_upload, not_published),
    planted("an upload built from another job file", "wrongjob", upload_for_other_job_file, not_published),
];

/// Every job in the spool: (id, priority, time limit).
const JOBS: [(&str, u32, &str); 18] = [
    ("good", 1000, "1h"),
    ("victim", 100, "1h"),
    ("named", 100, "1h"),
    ("trav", 100, "1h"),
    ("travout", 100, "1h"),
    ("listjob", 100, "1h"),
    ("tokjob", 100, "1h"),
    ("bigattempt", 100, "1h"),
    ("short", 100, "2s"),
    ("escapes", 100, "1h"),
    ("escphase", 100, "1h"),
    ("huge", 100, "1h"),
    ("hugelease", 100, "1h"),
    ("nonutf8", 100, "1h"),
    ("malformed", 100, "1h"),
    ("forged", 100, "1h"),
    ("wrongjob", 100, "1h"),
    ("masterlease", 100, "1h"),
];
const PAYLOAD: &str = "base.tar";

struct Ctx {
    server: JobServer,
    local: LocalSpool,
    /// The attacker's requests, by hand.
    raw: RawSftp,
    _raw_ssh: SshSession,
    /// Outside the chroot altogether.
    canary_outside: tempfile::TempDir,
    canaries: BTreeMap<PathBuf, Vec<u8>>,
    jobs_before: JobList,
    job_files_before: BTreeMap<String, Vec<u8>>,
    victim_lease: Vec<u8>,
    master_lease: Vec<u8>,
    /// Every master command run, in order.
    runs: Vec<Run>,
    /// Paths on this host that a traversal must not have created.
    must_not_exist: Vec<PathBuf>,
}

impl Ctx {
    fn session(&self) -> Result<SshSession, String> {
        SshSession::connect(&self.server.agent_server(), &SessionOptions::default())
            .map_err(|e| format!("connecting as the agent: {e:#}"))
    }

    fn local_path(&self, rel: &str) -> PathBuf {
        self.local.path(rel)
    }

    /// Runs `kiln-master --spool SPOOL ARGS`, with its peak memory.
    fn master(&mut self, args: &[&str]) -> &Run {
        let run = run_measured(&self.server, args);
        self.runs.push(run);
        self.runs.last().expect("just pushed")
    }

    fn reap(&mut self) -> Held {
        self.master(&["reap"]).ok()
    }

    fn job_list(&self) -> Result<JobList, String> {
        read_job_list(&self.local).map_err(|e| format!("reading jobs.toml: {e}"))
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, String> {
        Ok(self.job_list()?.get(id).cloned())
    }

    /// The attacker's lease for `job`, as `claim_next` would write it but
    /// with the given fields.
    fn put_lease(&mut self, name: &str, lease: &Lease) -> Held {
        put_new(
            &mut self.raw,
            &format!("{S}/leases/{name}"),
            lease.to_toml().as_bytes(),
        )
    }
}

/// A well-formed lease on `job`, as `claim_next` writes one.
fn lease(job: &str, agent: &str) -> Lease {
    let now = Timestamp::now();
    Lease {
        job: job.into(),
        agent: agent.into(),
        token: format!("1-{}", kiln_spool::spool::random_hex(12)),
        acquired: now,
        deadline: now.plus(Duration::from_secs(3600)),
        attempt: 1,
    }
}

/// `Ok` if the server refused `r`; `Err` naming `what` if it went through.
fn was_refused<T>(what: &str, r: anyhow::Result<Reply<T>>) -> Held {
    match r {
        Ok(Err(_)) => Ok(()),
        Ok(Ok(_)) => Err(format!("{what}: the server did it")),
        Err(e) => Err(format!("{what}: {e:#}")),
    }
}

/// One request of an attack: what it was and how the server answered.
struct Try(String, anyhow::Result<Reply<()>>);

fn t(what: impl Into<String>, r: anyhow::Result<Reply<()>>) -> Try {
    Try(what.into(), r)
}

/// `Ok` if the server refused every one of `tries`.
fn all_refused(tries: Vec<Try>) -> Held {
    let failed: Vec<String> = tries
        .into_iter()
        .filter_map(|Try(what, r)| was_refused(&what, r).err())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Creates `path` with `data`; planting must work for the master to see it.
fn put_new(raw: &mut RawSftp, path: &str, data: &[u8]) -> Held {
    match raw.put(path, CREAT | TRUNC, data) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(r)) => Err(format!("planting {path}: the server refused ({r})")),
        Err(e) => Err(format!("planting {path}: {e:#}")),
    }
}

fn mkdir(raw: &mut RawSftp, path: &str) -> Held {
    match raw.mkdir(path) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(r)) => Err(format!("making {path}: the server refused ({r})")),
        Err(e) => Err(format!("making {path}: {e:#}")),
    }
}

/// A sparse file of `size` bytes: one byte written at its end.
fn put_sparse(raw: &mut RawSftp, path: &str, size: u64) -> Held {
    let h = match raw.open_file(path, WRITE | CREAT | TRUNC) {
        Ok(Ok(h)) => h,
        Ok(Err(r)) => return Err(format!("planting {path}: the server refused ({r})")),
        Err(e) => return Err(format!("planting {path}: {e:#}")),
    };
    let wrote = raw.write_at(&h, size - 1, b"\n");
    let closed = raw.close(&h);
    match (wrote, closed) {
        (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
        other => Err(format!("planting {path}: {other:?}")),
    }
}

// ----- the set-up and the run -----

fn job_text(id: &str, priority: u32, limit: &str) -> String {
    let payload = if id == "victim" {
        format!("\n[[payloads]]\nname = \"{PAYLOAD}\"\n")
    } else {
        String::new()
    };
    format!(
        "id = \"{id}\"\npriority = {priority}\ntime_limit = \"{limit}\"\nmax_attempts = 3\n\
         {payload}\n[disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\n\
         fs = \"ext4\"\nmount = \"/\"\n"
    )
}

fn set_up() -> Ctx {
    let server = JobServer::start().unwrap_or_else(|e| panic!("starting the job server: {e:#}"));
    let local = LocalSpool::new(server.spool());
    let work = tempfile::tempdir().unwrap();

    let payload = work.path().join(PAYLOAD);
    fs::write(&payload, b"a payload the jobs pin\n").unwrap();
    server
        .master(&["payload", "add", &payload.display().to_string()])
        .unwrap();
    let mut files = Vec::new();
    for (id, prio, limit) in JOBS {
        let f = work.path().join(format!("{id}.toml"));
        fs::write(&f, job_text(id, prio, limit)).unwrap();
        files.push(f.display().to_string());
    }
    let mut args = vec!["add"];
    args.extend(files.iter().map(String::as_str));
    server.master(&args).unwrap();

    // An earlier job's published image and history, the master's own.
    let old = local.path("images/old");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join(IMAGE_FILE), b"an earlier image").unwrap();
    fs::write(local.path("history/old.toml"), b"# an earlier job\n").unwrap();

    // Canaries: one in the agents' chroot beside the spool, one outside it.
    let canary_in_chroot = server.chroot().join("canary");
    fs::create_dir_all(canary_in_chroot.join("dir")).unwrap();
    let canary_outside = tempfile::Builder::new()
        .prefix("canary.")
        .tempdir_in(BASE)
        .unwrap();
    fs::create_dir_all(canary_outside.path().join("dir")).unwrap();
    let mut canaries = BTreeMap::new();
    for base in [canary_in_chroot.as_path(), canary_outside.path()] {
        for f in ["file", "dir/file"] {
            let p = base.join(f);
            fs::write(&p, format!("canary {}\n", p.display())).unwrap();
            canaries.insert(p.clone(), fs::read(&p).unwrap());
        }
    }

    // An honest agent holds victim; a lease file the master wrote.
    let honest = SftpSpool::connect(&server.agent_server(), &SessionOptions::default()).unwrap();
    let victim = lease("victim", "honest");
    assert!(honest
        .create_exclusive("leases/victim", victim.to_toml().as_bytes())
        .unwrap());
    local
        .write_atomic(
            "leases/masterlease",
            lease("masterlease", "agent-m").to_toml().as_bytes(),
        )
        .unwrap();

    let raw_ssh = SshSession::connect(&server.agent_server(), &SessionOptions::default()).unwrap();
    let raw = RawSftp::open(raw_ssh.session()).unwrap();
    let jobs_before = read_job_list(&local).unwrap();
    let job_files_before = JOBS
        .iter()
        .map(|(id, _, _)| {
            (
                id.to_string(),
                fs::read(local.path(&format!("jobs/{id}.toml"))).unwrap(),
            )
        })
        .collect();
    let mut c = Ctx {
        victim_lease: fs::read(local.path("leases/victim")).unwrap(),
        master_lease: fs::read(local.path("leases/masterlease")).unwrap(),
        server,
        local,
        raw,
        _raw_ssh: raw_ssh,
        canary_outside,
        canaries,
        jobs_before,
        job_files_before,
        runs: Vec::new(),
        must_not_exist: Vec::new(),
    };
    // The master sees the honest leases.
    c.reap().unwrap();
    c
}

/// The good job: claimed, built (a random image) and uploaded by an agent
/// with the agent's own functions.
struct GoodJob {
    fs: SftpSpool,
    lease: Lease,
    manifest: ImageManifest,
    image: PathBuf,
    _work: tempfile::TempDir,
}

fn claim_good(c: &Ctx) -> GoodJob {
    let fs = SftpSpool::connect(&c.server.agent_server(), &SessionOptions::default()).unwrap();
    let lease = claim_next(&fs, "good-agent", Timestamp::now())
        .unwrap()
        .expect("a job to claim");
    assert_eq!(lease.job, "good", "the highest priority is claimed first");
    let pinned = read_job_list(&fs)
        .unwrap()
        .get("good")
        .unwrap()
        .blake3
        .clone();
    let work = tempfile::tempdir().unwrap();
    let (image, manifest) = random_image(work.path(), "good", &pinned, 3 << 20).unwrap();
    GoodJob {
        fs,
        lease,
        manifest,
        image,
        _work: work,
    }
}

fn upload_good(good: &GoodJob) {
    let opts = UploadOptions {
        chunk_size: 1 << 20,
    };
    upload(
        &good.fs,
        &good.lease,
        &good.image,
        &good.manifest,
        None,
        &opts,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("the good upload: {e}"));
}

fn good_published(c: &Ctx, good: &GoodJob) -> Held {
    let image = c.local_path(&format!("images/good/{IMAGE_FILE}"));
    let got = file_blake3(&image).map_err(|e| format!("the good job's image: {e:#}"))?;
    if got != good.manifest.image_blake3 {
        return Err(format!(
            "the good job's image has BLAKE3 {got}, its manifest {}",
            good.manifest.image_blake3
        ));
    }
    if !c.local_path("history/good.toml").exists() {
        return Err("history/good.toml is missing".into());
    }
    if c.entry("good")?.is_some() {
        return Err("good is still in the job list".into());
    }
    Ok(())
}

#[test]
fn a_hostile_agent_gets_nowhere_and_a_good_job_still_goes_through() {
    let mut c = set_up();
    let good = claim_good(&c);
    // Each attack's outcome so far, in table order.
    let mut outcomes: Vec<(&str, Held)> = Vec::new();

    // Refused by sshd: each request fails and the master's files stay as
    // they were, checked right after each attack.
    for a in ATTACKS {
        if let How::Refused { action, .. } = a.how {
            let before = fingerprint(&c);
            let r = action(&mut c);
            let changed = fingerprint_diff(&before, &fingerprint(&c));
            let r = match r {
                Ok(()) if changed.is_empty() => Ok(()),
                Ok(()) => Err(format!(
                    "refused, yet the master's files changed: {changed:?}"
                )),
                Err(e) if changed.is_empty() => Err(e),
                Err(e) => Err(format!("{e}; the master's files changed: {changed:?}")),
            };
            outcomes.push((a.name, r));
        }
    }

    // The good agent uploads while the attacker plants.
    upload_good(&good);
    for a in ATTACKS {
        if let How::Planted { job, action, .. } = a.how {
            let r = action(&mut c, job).map_err(|e| format!("could not be tried: {e}"));
            outcomes.push((a.name, r));
        }
    }

    // The master's pass, as `kiln-master serve` would run it.
    let first_pass = c.reap();

    // Every attack's check, after the passes.
    for a in ATTACKS {
        let r = match a.how {
            How::Refused { check, .. } => check(&mut c),
            How::Planted { job, check, .. } => check(&mut c, job),
        };
        let outcome = outcomes
            .iter_mut()
            .find(|(n, _)| *n == a.name)
            .expect("every attack was tried");
        if outcome.1.is_ok() {
            outcome.1 = r;
        }
    }

    // What must hold whatever the attacks.
    let invariants: Vec<(&str, Held)> = vec![
        (
            "the master's first pass after the attacks succeeds",
            first_pass,
        ),
        (
            "the good job is published and its BLAKE3 verified",
            good_published(&c, &good),
        ),
        ("nothing outside the spool is touched", canaries_alive(&c)),
        (
            "the job list and job files change only as the master changes them",
            job_list_intact(&c),
        ),
    ];

    let tried = outcomes.len();
    let held = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
    for (name, r) in &outcomes {
        match r {
            Ok(()) => eprintln!("held    {name}"),
            Err(e) => eprintln!("BROKEN  {name}: {e}"),
        }
    }
    for (name, r) in &invariants {
        if let Err(e) = r {
            eprintln!("FAILED  {name}: {e}");
        }
    }
    println!("{tried} attacks tried, {held} held");
    let broken: Vec<&str> = outcomes
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| *n)
        .collect();
    let failed: Vec<&str> = invariants
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| *n)
        .collect();
    if !broken.is_empty() || !failed.is_empty() {
        eprintln!("{}", c.server.sshd().log_tail());
    }
    assert!(
        broken.is_empty() && failed.is_empty(),
        "{tried} attacks tried, {held} held; not held: {broken:?}; failed: {failed:?}"
    );
}
