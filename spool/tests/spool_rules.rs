//! The spool rules on a real local spool: exclusive claims under contention,
//! lease expiry with time as a parameter, and publishing only what the
//! current lease uploaded, whole and verified.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_spool::agent::claim::{check_lease, claim_next, LeaseCheck};
use kiln_spool::lease::Lease;
use kiln_spool::master::reap;
use kiln_spool::master::{self, job_view, JobState};
use kiln_spool::queue::read_job_list;
use kiln_spool::queue::EntryState;
use kiln_spool::spool::{image_dir, incoming_dir};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{chunk_name, IMAGE_FILE, MANIFEST};
use kiln_spool::{LocalSpool, SpoolFs};

mod upload_fixture;
use upload_fixture::upload;

const T0: Timestamp = Timestamp(1_900_000_000);

fn job_text(id: &str, priority: u32, time_limit: &str, max_attempts: u32) -> String {
    format!(
        "id = \"{id}\"\npriority = {priority}\ntime_limit = \"{time_limit}\"\nmax_attempts = {max_attempts}\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
    )
}

fn new_spool() -> (tempfile::TempDir, LocalSpool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = LocalSpool::new(dir.path());
    master::init(&spool).unwrap();
    (dir, spool)
}

fn add(spool: &LocalSpool, id: &str, priority: u32, time_limit: &str, max_attempts: u32) {
    master::add_job(
        spool,
        &job_text(id, priority, time_limit, max_attempts),
        Path::new("test.toml"),
        T0,
    )
    .unwrap();
}

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const CHILD_SPOOL: &str = "KILN_TEST_CLAIMER_SPOOL";
const CHILD_AGENT: &str = "KILN_TEST_CLAIMER_AGENT";

/// Claims until nothing is left; returns the job ids in claim order.
fn claim_all(spool: &LocalSpool, agent: &str, go: &Path) -> Vec<String> {
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut got = Vec::new();
    while let Some(lease) = claim_next(spool, agent, T0).unwrap() {
        assert_eq!(lease.agent, agent);
        got.push(lease.job);
    }
    got
}

/// Not a test on its own: the separate-process claimer that
/// `claims_are_exclusive_and_in_priority_order` starts.
#[test]
fn claimer_child() {
    let (Ok(dir), Ok(agent)) = (std::env::var(CHILD_SPOOL), std::env::var(CHILD_AGENT)) else {
        return;
    };
    let spool = LocalSpool::new(&dir);
    for id in claim_all(&spool, &agent, &Path::new(&dir).join("go")) {
        println!("CLAIMED {id}");
    }
}

#[test]
fn claims_are_exclusive_and_in_priority_order() {
    let (dir, spool) = new_spool();
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    for i in 0..200 {
        add(
            &spool,
            &format!("job-{i:03}"),
            (rng.next() % 1001) as u32,
            "1h",
            3,
        );
    }
    // Rank of each job in the order agents must take them.
    let list = read_job_list(&spool).unwrap();
    let rank: BTreeMap<String, usize> = list
        .jobs
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.clone(), i))
        .collect();
    let go = dir.path().join("go");

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "claimer_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_SPOOL, dir.path())
                .env(CHILD_AGENT, format!("proc-{i}"))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let per_claimer: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (spool, go) = (&spool, &go);
                s.spawn(move || {
                    (
                        format!("thread-{i}"),
                        claim_all(spool, &format!("thread-{i}"), go),
                    )
                })
            })
            .collect();
        std::fs::write(&go, b"").unwrap();
        let mut out: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for (i, child) in children.into_iter().enumerate() {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "claimer process {i} failed");
            let ids = String::from_utf8(output.stdout)
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once("CLAIMED ").map(|(_, id)| id))
                .map(str::to_string)
                .collect();
            out.push((format!("proc-{i}"), ids));
        }
        out
    });

    let mut all = BTreeMap::new();
    for (claimer, ids) in &per_claimer {
        for id in ids {
            if let Some(other) = all.insert(id.clone(), claimer.clone()) {
                panic!("{id} claimed by both {other} and {claimer}");
            }
        }
        // The available set only shrinks, so each claimer's jobs come in
        // strictly increasing queue rank: non-increasing priority, ties by submission.
        let ranks: Vec<usize> = ids.iter().map(|id| rank[id]).collect();
        assert!(
            ranks.windows(2).all(|w| w[0] < w[1]),
            "{claimer} took jobs out of order: {ranks:?}"
        );
    }
    assert_eq!(all.len(), 200, "every job claimed exactly once");
    let procs = per_claimer
        .iter()
        .filter(|(c, ids)| c.starts_with("proc-") && !ids.is_empty())
        .count();
    let threads = per_claimer
        .iter()
        .filter(|(c, ids)| c.starts_with("thread-") && !ids.is_empty())
        .count();
    eprintln!("claims spread over {threads} threads and {procs} processes");
    // Each lease on disk names the claimer that got it.
    for (id, claimer) in &all {
        let lease =
            Lease::parse(&String::from_utf8(spool.read(&format!("leases/{id}")).unwrap()).unwrap())
                .unwrap();
        assert_eq!(&lease.agent, claimer);
    }
}

fn image_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed);
    (0..n).map(|_| rng.next() as u8).collect()
}

#[test]
fn expired_leases_are_reaped_and_stale_tokens_refused() {
    let (_dir, spool) = new_spool();
    add(&spool, "a", 500, "10m", 2);

    let first = claim_next(&spool, "agent-1", T0)
        .unwrap()
        .expect("a is available");
    assert_eq!(first.attempt, 1);
    assert_eq!(first.deadline, T0.plus(Duration::from_secs(600)));
    assert!(
        claim_next(&spool, "agent-2", T0).unwrap().is_none(),
        "a held job is not available"
    );

    // The master's deadline counts from its first sight of the lease;
    // before it nothing happens.
    let report = reap(&spool, T0).unwrap();
    assert!(report.is_empty(), "{report:?}");
    let report = reap(&spool, T0.plus(Duration::from_secs(599))).unwrap();
    assert!(report.released.is_empty(), "{report:?}");
    assert_eq!(check_lease(&spool, &first).unwrap(), LeaseCheck::Held);

    // At the deadline the lease is reaped and the attempt counted.
    let t1 = T0.plus(Duration::from_secs(600));
    let report = reap(&spool, t1).unwrap();
    assert_eq!(report.released.len(), 1, "{report:?}");
    assert_eq!(report.released[0].1, EntryState::Queued);
    assert_eq!(check_lease(&spool, &first).unwrap(), LeaseCheck::Gone);
    let view = job_view(&spool, "a", t1).unwrap();
    assert_eq!((view.state, view.attempts), (JobState::Queued, 1));

    // Claimable again, with a new token.
    let second = claim_next(&spool, "agent-2", t1)
        .unwrap()
        .expect("a is available again");
    assert_ne!(second.token, first.token);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        check_lease(&spool, &first).unwrap(),
        LeaseCheck::Replaced {
            by_agent: "agent-2".into()
        }
    );

    // The first holder's late upload is refused, and nothing is published.
    upload(&spool, &first, &image_bytes(10_000, 1), 4096);
    let report = reap(&spool, t1).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(
        report.refused[0].2.contains("not the job's current lease"),
        "{report:?}"
    );
    assert!(!spool.exists(&incoming_dir("a", &first.token)).unwrap());
    assert!(!spool.path(&image_dir("a")).exists());
    assert_eq!(check_lease(&spool, &second).unwrap(), LeaseCheck::Held);

    // The second lease expires too: out of attempts, the job fails.
    let t2 = t1.plus(Duration::from_secs(600));
    let report = reap(&spool, t2).unwrap();
    assert_eq!(report.released[0].1, EntryState::Failed, "{report:?}");
    let view = job_view(&spool, "a", t2).unwrap();
    assert_eq!((view.state, view.attempts), (JobState::Failed, 2));
    assert!(
        view.message.contains("no attempts left"),
        "{}",
        view.message
    );
    assert!(
        claim_next(&spool, "agent-3", t2).unwrap().is_none(),
        "a failed job is not available"
    );
}

#[test]
fn a_verified_upload_is_published_whole() {
    let (_dir, spool) = new_spool();
    add(&spool, "web", 500, "1h", 3);
    add(&spool, "db", 400, "1h", 3);
    let lease = claim_next(&spool, "agent-1", T0).unwrap().unwrap();
    assert_eq!(lease.job, "web");
    let image = image_bytes(100_000, 7);

    // An upload without its manifest is not complete: nothing happens.
    let manifest = upload(&spool, &lease, &image, 30_000);
    let dir = incoming_dir("web", &lease.token);
    let manifest_text = spool.read(&format!("{dir}/{MANIFEST}")).unwrap();
    spool.remove(&format!("{dir}/{MANIFEST}")).unwrap();
    let report = reap(&spool, T0).unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert!(!spool.path(&image_dir("web")).exists());

    spool
        .write_atomic(&format!("{dir}/{MANIFEST}"), &manifest_text)
        .unwrap();
    let report = reap(&spool, T0).unwrap();
    assert_eq!(report.published, ["web"], "{report:?}");
    let published =
        std::fs::read(spool.path(&format!("{}/{IMAGE_FILE}", image_dir("web")))).unwrap();
    assert_eq!(
        blake3::hash(&published).to_hex().as_str(),
        manifest.image_blake3
    );
    assert_eq!(published, image);

    let list = read_job_list(&spool).unwrap();
    assert!(list.get("web").is_none(), "a done job leaves jobs.toml");
    assert_eq!(job_view(&spool, "web", T0).unwrap().state, JobState::Done);
    assert!(!spool.exists("leases/web").unwrap());
    assert!(spool.list("incoming").unwrap().is_empty());
    let ids: BTreeSet<String> = master::job_views(&spool, T0)
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, BTreeSet::from(["web".to_string(), "db".to_string()]));
}

#[test]
fn a_flipped_bit_is_refused_and_the_job_requeued() {
    let (_dir, spool) = new_spool();
    add(&spool, "web", 500, "1h", 3);
    let lease = claim_next(&spool, "agent-1", T0).unwrap().unwrap();
    upload(&spool, &lease, &image_bytes(100_000, 9), 30_000);
    let path = spool.path(&format!(
        "{}/{}",
        incoming_dir("web", &lease.token),
        chunk_name(2)
    ));
    let mut chunk = std::fs::read(&path).unwrap();
    chunk[1234] ^= 0x10;
    std::fs::write(&path, chunk).unwrap();

    let report = reap(&spool, T0).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(
        report.refused[0].2.contains("chunk 2 has BLAKE3"),
        "{report:?}"
    );
    assert!(
        !spool.path(&image_dir("web")).exists(),
        "nothing half-published"
    );
    assert!(
        spool.list("images").unwrap().is_empty(),
        "no temporary image left behind"
    );
    let view = job_view(&spool, "web", T0).unwrap();
    assert_eq!((view.state, view.attempts), (JobState::Queued, 1));
    assert!(view.message.contains("upload refused"), "{}", view.message);
    let again = claim_next(&spool, "agent-2", T0).unwrap().unwrap();
    assert_eq!((again.job.as_str(), again.attempt), ("web", 2));
}

#[test]
fn operator_actions_change_the_job_list() {
    let (_dir, spool) = new_spool();
    add(&spool, "a", 100, "1h", 3);
    add(&spool, "b", 200, "1h", 3);
    add(&spool, "c", 200, "1h", 3);
    let order = |spool: &LocalSpool| -> Vec<String> {
        read_job_list(spool)
            .unwrap()
            .jobs
            .into_iter()
            .map(|e| e.id)
            .collect()
    };
    assert_eq!(
        order(&spool),
        ["b", "c", "a"],
        "priority first, then submission"
    );

    master::set_priority(&spool, "a", 300).unwrap();
    assert_eq!(order(&spool), ["a", "b", "c"]);
    assert_eq!(master::shift(&spool, "c", true).unwrap(), Some(200));
    assert_eq!(order(&spool), ["a", "c", "b"]);
    assert_eq!(master::shift(&spool, "c", true).unwrap(), Some(300));
    assert_eq!(order(&spool), ["c", "a", "b"]);
    assert_eq!(
        master::shift(&spool, "c", true).unwrap(),
        None,
        "already first"
    );

    let lease = claim_next(&spool, "agent-1", T0).unwrap().unwrap();
    assert_eq!(lease.job, "c");
    master::cancel(&spool, "c", T0).unwrap();
    assert_eq!(
        check_lease(&spool, &lease).unwrap(),
        LeaseCheck::Gone,
        "cancel ends the lease"
    );
    assert_eq!(
        job_view(&spool, "c", T0).unwrap().state,
        JobState::Cancelled
    );
    assert!(master::cancel(&spool, "c", T0).is_err(), "cancelled twice");
    master::requeue(&spool, "c", T0).unwrap();
    assert_eq!(job_view(&spool, "c", T0).unwrap().state, JobState::Queued);
    assert!(
        master::requeue(&spool, "c", T0).is_err(),
        "a queued job cannot be requeued"
    );

    let lease = claim_next(&spool, "agent-1", T0).unwrap().unwrap();
    let extended = master::extend(&spool, &lease.job, Duration::from_secs(600), T0).unwrap();
    assert_eq!(
        extended.deadline,
        lease.deadline.plus(Duration::from_secs(600))
    );
    assert_eq!(
        check_lease(&spool, &lease).unwrap(),
        LeaseCheck::Held,
        "extending keeps the token"
    );
    assert_eq!(
        master::reclaim(&spool, &lease.job, T0).unwrap(),
        EntryState::Queued
    );
    assert_eq!(job_view(&spool, &lease.job, T0).unwrap().attempts, 1);
}

#[test]
fn job_files_dropped_into_jobs_are_taken_in_or_marked_invalid() {
    let (_dir, spool) = new_spool();
    spool
        .write_atomic("jobs/good.toml", job_text("good", 10, "1h", 3).as_bytes())
        .unwrap();
    spool
        .write_atomic("jobs/bad.toml", job_text("bad", 5000, "1h", 3).as_bytes())
        .unwrap();
    spool
        .write_atomic(
            "jobs/other.toml",
            job_text("not-other", 10, "1h", 3).as_bytes(),
        )
        .unwrap();
    let report = reap(&spool, T0).unwrap();
    assert_eq!(report.ingested, ["good"]);
    let invalid: BTreeMap<_, _> = report.invalid.into_iter().collect();
    assert!(
        invalid["bad"].contains("jobs/bad.toml: priority: 5000 is out of range"),
        "{invalid:?}"
    );
    assert!(
        invalid["other"].contains("differs from the file name"),
        "{invalid:?}"
    );
    assert_eq!(
        job_view(&spool, "bad", T0).unwrap().state,
        JobState::Invalid
    );
    assert_eq!(claim_next(&spool, "a", T0).unwrap().unwrap().job, "good");
    assert!(
        reap(&spool, T0).unwrap().ingested.is_empty(),
        "taken in once"
    );
}

#[test]
fn claims_never_outlive_a_cancel_or_publish() {
    // Claimers race a master that cancels jobs as they go. A claimer that
    // read the job list before a cancel must not keep a lease after it.
    let (_dir, spool) = new_spool();
    for i in 0..150 {
        add(&spool, &format!("job-{i:03}"), 500, "1h", 3);
    }
    let cancelled = std::sync::Mutex::new(BTreeSet::new());
    std::thread::scope(|s| {
        for t in 0..6 {
            let spool = &spool;
            s.spawn(move || {
                while claim_next(spool, &format!("claimer-{t}"), T0)
                    .unwrap()
                    .is_some()
                {}
            });
        }
        let (spool, cancelled) = (&spool, &cancelled);
        s.spawn(move || {
            for i in (0..150).rev() {
                let id = format!("job-{i:03}");
                let _lock = spool.lock().unwrap();
                if master::cancel(spool, &id, T0).is_ok() {
                    cancelled.lock().unwrap().insert(id);
                }
            }
        });
    });
    let cancelled = cancelled.into_inner().unwrap();
    assert!(!cancelled.is_empty());
    for id in spool.list("leases").unwrap() {
        assert!(
            !cancelled.contains(&id),
            "{id} was cancelled but a lease on it remains"
        );
    }
    let leased = spool.list("leases").unwrap().len();
    assert_eq!(
        leased + cancelled.len(),
        150,
        "every job is either leased or cancelled"
    );
}
