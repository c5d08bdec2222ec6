//! What an agent can leave in the spool, against the master's pass: each
//! case plants what a hostile agent could write (plus, where sshd refuses it
//! over SFTP, what a local mistake could: symlinks, FIFOs), runs a pass with
//! time as a parameter, and checks that nothing outside the spool was
//! touched or revealed, that the pass went on, and that a good job beside
//! it was still published.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use kiln_spool::agent::claim::{claim_next, pinned_job_hash};
use kiln_spool::lease::Lease;
use kiln_spool::master::{self, job_view, reap, JobState};
use kiln_spool::queue::read_job_list;
use kiln_spool::spool::{image_dir, incoming_dir, lease_path, status_path};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{IMAGE_FILE, JOB_LOG, MANIFEST};
use kiln_spool::LocalSpool;

mod upload_fixture;
use upload_fixture::upload;

const T0: Timestamp = Timestamp(1_900_000_000);

struct Rig {
    _dir: tempfile::TempDir,
    spool: LocalSpool,
    /// A directory beside the spool standing for the rest of the server.
    outside: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::new(dir.path());
        master::init(&spool).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("keep")).unwrap();
        std::fs::write(outside.path().join("keep/canary"), "still here").unwrap();
        std::fs::write(outside.path().join("host_key"), "SECRET HOST KEY").unwrap();
        Rig {
            _dir: dir,
            spool,
            outside,
        }
    }

    fn root(&self) -> &Path {
        self.spool.root()
    }

    fn add(&self, id: &str, time_limit: &str) {
        let text = format!(
            "id = \"{id}\"\ntime_limit = \"{time_limit}\"\nmax_attempts = 3\n\
             [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
        );
        master::add_job(&self.spool, &text, Path::new("t.toml"), T0).unwrap();
    }

    fn claim(&self, agent: &str) -> Lease {
        claim_next(&self.spool, agent, T0).unwrap().unwrap()
    }

    /// A complete, correct upload for `lease`, in one chunk.
    fn upload(&self, lease: &Lease, image: &[u8]) {
        upload(&self.spool, lease, image, image.len());
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn outside_intact(&self) {
        let canary = std::fs::read_to_string(self.outside.path().join("keep/canary"));
        assert_eq!(
            canary.unwrap(),
            "still here",
            "the canary outside the spool is gone"
        );
        assert!(self.outside.path().join("host_key").exists());
    }

    /// Runs a pass beside a good job "good" that was claimed and uploaded,
    /// and checks the good job was published.
    fn pass_with_good_job(&self, now: Timestamp) -> master::ReapReport {
        let report = reap(&self.spool, now).unwrap();
        assert!(
            report.published.contains(&"good".to_string()),
            "the good job was not published: {report:?}"
        );
        self.outside_intact();
        report
    }
}

fn lease_text(job: &str, token: &str, deadline: &str, attempt: u32) -> String {
    format!(
        "job = {job:?}\nagent = \"evil\"\ntoken = {token:?}\nacquired = \"2030-01-01T00:00:00Z\"\n\
         deadline = {deadline:?}\nattempt = {attempt}\n"
    )
}

fn with_good_job() -> Rig {
    let rig = Rig::new();
    rig.add("good", "1h");
    let lease = rig.claim("honest");
    rig.upload(&lease, b"a good image");
    rig
}

#[test]
fn lease_fields_that_climb_out_of_the_spool_are_set_aside() {
    let rig = with_good_job();
    rig.add("x", "1h");
    // `job` is what the reaper once built its paths from.
    rig.write(
        "leases/x",
        &lease_text("x/../../..", "1-00aa", "2030-01-01T00:00:00Z", 1),
    );
    rig.write("incoming/x/1-00aa/keep", "");
    rig.write(
        "leases/y",
        &lease_text("../jobs.toml", "1-00bb", "2030-01-01T00:00:00Z", 1),
    );
    let report = rig.pass_with_good_job(T0);
    let aside: Vec<&str> = report.set_aside.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        aside.contains(&"leases/x") && aside.contains(&"leases/y"),
        "{report:?}"
    );
    assert!(
        report
            .set_aside
            .iter()
            .any(|(_, why)| why.contains("differs from the file name")),
        "{report:?}"
    );
    // The job list is the master's: "x" is still queued and the list parses.
    let list = read_job_list(&rig.spool).unwrap();
    assert_eq!(list.get("x").unwrap().attempts, 0);
    assert!(!rig.root().join("leases/x").exists());
}

#[test]
fn an_incoming_symlink_is_removed_as_a_link() {
    let rig = with_good_job();
    rig.add("x", "1h");
    symlink(rig.outside.path(), rig.root().join("incoming/x")).unwrap();
    symlink(rig.outside.path(), rig.root().join("incoming/not-a-job!")).unwrap();
    let report = rig.pass_with_good_job(T0);
    assert!(!rig.root().join("incoming/x").exists());
    assert!(
        report.set_aside.iter().any(|(p, _)| p == "incoming/x"),
        "{report:?}"
    );
    assert!(rig.outside.path().join("keep").is_dir());
}

#[test]
fn a_job_log_symlinked_to_a_secret_is_not_published() {
    let rig = Rig::new();
    rig.add("good", "1h");
    let lease = rig.claim("honest");
    rig.upload(&lease, b"image bytes");
    let log = rig
        .root()
        .join(incoming_dir("good", &lease.token))
        .join(JOB_LOG);
    symlink(rig.outside.path().join("host_key"), &log).unwrap();
    let report = rig.pass_with_good_job(T0);
    assert!(report.refused.is_empty(), "{report:?}");
    let published = rig.root().join(image_dir("good"));
    assert!(published.join(IMAGE_FILE).exists());
    let copied = std::fs::read_to_string(published.join(JOB_LOG)).unwrap_or_default();
    assert!(!copied.contains("SECRET"), "the host key was published");
}

#[test]
fn strays_and_odd_files_never_stop_a_pass() {
    let rig = with_good_job();
    rig.write("incoming/stray-file", "x");
    std::fs::create_dir_all(rig.root().join("incoming/stray-dir")).unwrap();
    std::fs::create_dir_all(rig.root().join("incoming/good-gone/1-00aa")).unwrap();
    rig.write("leases/not a job", "x");
    std::fs::create_dir_all(rig.root().join("leases/dir-lease/sub")).unwrap();
    rig.write("status/junk", "x");
    rig.write("logs/junk.txt", "x");
    symlink("/dev/zero", rig.root().join("status/good.toml")).unwrap();
    nix::unistd::mkfifo(
        &rig.root().join("status/fifo.toml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let report = rig.pass_with_good_job(T0);
    for p in [
        "incoming/stray-file",
        "incoming/stray-dir",
        "incoming/good-gone",
        "leases/not a job",
        "leases/dir-lease",
        "status/junk",
        "logs/junk.txt",
        "status/good.toml",
        "status/fifo.toml",
    ] {
        assert!(
            report.set_aside.iter().any(|(q, _)| q == p),
            "{p} was not set aside: {report:?}"
        );
        assert!(!rig.root().join(p).exists(), "{p} is still there");
    }
    // Reported once: the next pass finds nothing.
    let again = reap(&rig.spool, T0).unwrap();
    assert!(again.set_aside.is_empty(), "{again:?}");
}

#[test]
fn a_lease_dated_9999_ends_at_the_masters_deadline() {
    let rig = Rig::new();
    rig.add("x", "10m");
    let lease = rig.claim("evil");
    rig.write(
        &lease_path("x"),
        &lease_text("x", &lease.token, "9999-12-31T23:59:59Z", 0),
    );
    assert!(reap(&rig.spool, T0).unwrap().released.is_empty());
    let view = job_view(&rig.spool, "x", T0).unwrap();
    assert_eq!(view.deadline, Some(T0.plus(Duration::from_secs(600))));
    let report = reap(&rig.spool, T0.plus(Duration::from_secs(600))).unwrap();
    assert_eq!(report.released.len(), 1, "{report:?}");
    let view = job_view(&rig.spool, "x", T0).unwrap();
    assert_eq!((view.state, view.attempts), (JobState::Queued, 1));
}

#[test]
fn a_huge_or_hostile_status_is_not_read_whole_or_shown() {
    let rig = Rig::new();
    rig.add("x", "1h");
    let lease = rig.claim("n1");
    rig.write(&status_path("x"), &"x".repeat(10 << 20));
    let view = job_view(&rig.spool, "x", T0).unwrap();
    assert_eq!(view.state, JobState::Leased);
    assert!(view.status.is_none());
    rig.write(
        &status_path("x"),
        &format!(
            "job = \"x\"\nagent = \"n1\"\ntoken = \"{}\"\nstate = \"building\"\nphase = \"{}\"\n\
             progress = 0.5\nstarted = \"2030-01-01T00:00:00Z\"\nupdated = \"2030-01-01T00:00:00Z\"\n",
            lease.token,
            "p".repeat(1000)
        ),
    );
    assert!(job_view(&rig.spool, "x", T0).unwrap().status.is_none());
}

#[test]
fn an_upload_for_another_job_file_is_refused() {
    let rig = Rig::new();
    rig.add("x", "1h");
    let lease = rig.claim("n1");
    rig.upload(&lease, b"image");
    let manifest = rig
        .root()
        .join(incoming_dir("x", &lease.token))
        .join(MANIFEST);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let pinned = pinned_job_hash(&rig.spool, "x").unwrap();
    std::fs::write(&manifest, text.replace(&pinned, &"0".repeat(64))).unwrap();
    let report = reap(&rig.spool, T0).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert!(report.refused[0].2.contains("pins"), "{report:?}");
}

#[test]
fn a_publication_cut_short_is_finished_not_requeued() {
    let rig = Rig::new();
    rig.add("x", "10m");
    let lease = rig.claim("n1");
    rig.upload(&lease, b"the image");
    reap(&rig.spool, T0).unwrap_or_else(|e| panic!("{e}"));
    // That pass published; undo its bookkeeping as if the master had
    // stopped right after the rename into images/x/.
    let history = rig.root().join("history/x.toml");
    assert!(history.exists());
    std::fs::remove_file(&history).unwrap();
    let mut list = read_job_list(&rig.spool).unwrap();
    let mut entry = kiln_spool::queue::Entry {
        id: "x".into(),
        priority: 500,
        seq: 0,
        state: kiln_spool::queue::EntryState::Queued,
        attempts: 0,
        max_attempts: 3,
        time_limit: kiln_spool::units::TimeLimit::from_secs(600).unwrap(),
        submitted: T0,
        blake3: String::new(),
        message: String::new(),
        lease: None,
    };
    entry.record_lease(&lease.token, T0);
    list.push(entry);
    master::write_job_list(&rig.spool, &list).unwrap();
    rig.write(
        &lease_path("x"),
        &lease_text("x", &lease.token, "2030-01-01T00:00:00Z", 1),
    );

    // The master comes back long after the lease's deadline.
    let later = T0.plus(Duration::from_secs(86_400));
    let report = reap(&rig.spool, later).unwrap();
    assert_eq!(report.published, vec!["x".to_string()], "{report:?}");
    assert!(report.released.is_empty(), "{report:?}");
    assert_eq!(
        job_view(&rig.spool, "x", later).unwrap().state,
        JobState::Done
    );
    assert!(!rig.root().join("leases/x").exists());
}
