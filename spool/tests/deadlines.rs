//! Deadlines stay within what a timestamp can write, whatever the job, the
//! job list, the lease or the clock say: adding, claiming and extending
//! refuse or saturate, and never panic. Time is a parameter throughout.

use std::path::Path;
use std::time::Duration;

use kiln_spool::agent::claim::claim_next;
use kiln_spool::lease::{read_lease, Lease};
use kiln_spool::master;
use kiln_spool::queue::{read_job_list, JobList};
use kiln_spool::spool::{lease_path, JOB_LIST};
use kiln_spool::time::Timestamp;
use kiln_spool::units::TimeLimit;
use kiln_spool::{LocalSpool, SpoolFs};

const T0: Timestamp = Timestamp(1_900_000_000);

fn job_text(id: &str, time_limit: &str) -> String {
    format!(
        "id = \"{id}\"\ntime_limit = \"{time_limit}\"\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
    )
}

fn new_spool() -> (tempfile::TempDir, LocalSpool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = LocalSpool::new(dir.path());
    master::init(&spool).unwrap();
    (dir, spool)
}

fn add(spool: &LocalSpool, id: &str, time_limit: &str) {
    master::add_job(spool, &job_text(id, time_limit), Path::new("job.toml"), T0).unwrap();
}

fn read_text(spool: &LocalSpool, path: &str) -> String {
    String::from_utf8(spool.read(path).unwrap()).unwrap()
}

#[test]
fn add_refuses_a_time_limit_past_a_week_and_names_the_field() {
    let (_dir, spool) = new_spool();
    for limit in ["10000y", "8d"] {
        let e = master::add_job(&spool, &job_text("a", limit), Path::new("a.toml"), T0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.toml") && e.contains("time_limit") && e.contains("7days"),
            "{e}"
        );
    }
    assert!(read_job_list(&spool).unwrap().jobs.is_empty());
}

#[test]
fn a_job_list_entry_past_a_week_is_an_error_for_agents_not_a_panic() {
    let (_dir, spool) = new_spool();
    add(&spool, "a", "1h");
    let text = read_text(&spool, JOB_LIST);
    let forged = text.replace("time_limit = \"1h\"", "time_limit = \"10000y\"");
    assert_ne!(forged, text, "the job list writes the time limit as \"1h\"");
    let e = JobList::parse(&forged).unwrap_err().to_string();
    assert!(e.contains("time_limit") && e.contains("7days"), "{e}");

    spool.write_atomic(JOB_LIST, forged.as_bytes()).unwrap();
    assert!(claim_next(&spool, "agent-1", T0).is_err());
    assert!(
        !spool.exists(&lease_path("a")).unwrap(),
        "no lease was made"
    );
}

#[test]
fn a_claim_near_the_last_timestamp_gets_the_last_deadline() {
    let (_dir, spool) = new_spool();
    add(&spool, "a", "7days");
    let late = Timestamp(Timestamp::MAX.0 - 60);
    let lease = claim_next(&spool, "agent-1", late).unwrap().unwrap();
    assert_eq!(lease.deadline, Timestamp::MAX);
    assert_eq!(read_lease(&spool, "a").unwrap().unwrap(), lease);

    // A clock past the year 9999 reads as the last second.
    let lease = Lease::new("b", "agent-1", Timestamp(u64::MAX), TimeLimit::MAX, 1);
    assert_eq!(lease.deadline, Timestamp::MAX);
    assert_eq!(
        Lease::parse(&lease.to_toml()).unwrap().deadline,
        Timestamp::MAX
    );
}

#[test]
fn a_lease_dated_9999_is_held_to_the_masters_deadline() {
    let (_dir, spool) = new_spool();
    add(&spool, "a", "1h");
    let mut lease = claim_next(&spool, "agent-1", T0).unwrap().unwrap();
    // What an agent may write into its own lease.
    lease.deadline = Timestamp::MAX;
    lease.attempt = 0;
    let text = lease.to_toml();
    assert!(text.contains("9999-12-31T23:59:59Z"), "{text}");
    spool
        .write_atomic(&lease_path("a"), text.as_bytes())
        .unwrap();

    // The master counts from when it first saw the lease, whatever it says.
    master::reap(&spool, T0).unwrap();
    let extended = master::extend(&spool, "a", Duration::from_secs(600), T0).unwrap();
    assert_eq!(extended.deadline, T0.plus(Duration::from_secs(3600 + 600)));
    assert_eq!(extended.attempt, 1, "the master counts attempts itself");
    let e = master::extend(&spool, "a", Duration::MAX, T0).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    let report = master::reap(&spool, T0.plus(Duration::from_secs(3600 + 600))).unwrap();
    assert_eq!(report.released.len(), 1, "{report:?}");
    assert!(read_lease(&spool, "a").unwrap().is_none());
}

#[test]
fn a_lease_dated_past_9999_does_not_parse() {
    let lease = Lease::new("a", "agent-1", T0, TimeLimit::MAX, 1);
    let text = lease
        .to_toml()
        .replace(&lease.deadline.to_string(), "10000-01-01T00:00:00Z");
    assert!(Lease::parse(&text).is_err());
}
