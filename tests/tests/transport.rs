//! The agent's transport against OpenSSH's sshd on 127.0.0.1, set up as an
//! operator sets up a job server (`kiln-master init --agent-user` and
//! `agent-key`): the spool over SFTP as the agents' account, pinned host
//! keys, claims racing across sessions, the confined key, and resumable,
//! verified uploads that the master publishes.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use kiln_e2e::fake_image::{file_blake3, random_image};
use kiln_e2e::job_server::{JobServer, AGENT_USER};
use kiln_spool::agent::claim::{check_lease, claim_next, LeaseCheck};
use kiln_spool::agent::uploader::{upload, UploadOptions};
use kiln_spool::master;
use kiln_spool::master::reap;
use kiln_spool::queue::{read_job_list, Entry, EntryState};
use kiln_spool::sftp::{HostKey, SessionOptions, SftpSpool};
use kiln_spool::spool::{history_path, image_dir, incoming_dir, LEASES, TMP_PREFIX};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{chunk_name, IMAGE_FILE, JOB_LOG, MANIFEST};
use kiln_spool::{LocalSpool, SpoolFs};

fn start() -> (JobServer, LocalSpool) {
    let server = JobServer::start().unwrap_or_else(|e| panic!("starting the job server: {e:#}"));
    let local = LocalSpool::new(server.spool());
    (server, local)
}

/// A session as the agents' account, with agent-key's key.
fn connect(server: &JobServer) -> SftpSpool {
    connect_with(server, &SessionOptions::default())
}

fn connect_with(server: &JobServer, opts: &SessionOptions) -> SftpSpool {
    SftpSpool::connect(&server.agent_server(), opts)
        .unwrap_or_else(|e| panic!("connecting: {e:#}\n{}", server.sshd().log_tail()))
}

#[test]
fn sftp_spool_semantics() {
    let (server, local) = start();
    let fs = connect(&server);
    assert_eq!(
        fs.session().cipher().as_deref(),
        Some("aes128-gcm@openssh.com")
    );

    // Missing things keep their error kinds.
    assert_eq!(fs.read("nope").unwrap_err().kind(), io::ErrorKind::NotFound);
    assert_eq!(fs.read_opt("nope").unwrap(), None);
    assert_eq!(fs.size("nope").unwrap(), None);
    assert_eq!(fs.list("no/such/dir").unwrap(), Vec::<String>::new());
    fs.remove("incoming/nope").unwrap();
    fs.remove_dir_all("incoming/no/such/dir").unwrap();

    // write_atomic creates and replaces.
    fs.write_atomic("status/a.toml", b"one").unwrap();
    assert_eq!(fs.read("status/a.toml").unwrap(), b"one");
    fs.write_atomic("status/a.toml", b"second").unwrap();
    assert_eq!(
        std::fs::read(local.path("status/a.toml")).unwrap(),
        b"second"
    );
    assert_eq!(fs.size("status/a.toml").unwrap(), Some(6));

    // create_exclusive: the first wins, the second sees it exists.
    assert!(fs.create_exclusive("leases/j1", b"mine").unwrap());
    assert!(!fs.create_exclusive("leases/j1", b"yours").unwrap());
    assert_eq!(fs.read("leases/j1").unwrap(), b"mine");

    // rename_noclobber refuses an existing target, with AlreadyExists.
    fs.write_atomic("incoming/x/a", b"a").unwrap_err();
    fs.mkdir_all("incoming/x/y/z").unwrap();
    fs.mkdir_all("incoming/x/y/z").unwrap();
    fs.write_atomic("incoming/x/a", b"a").unwrap();
    fs.write_atomic("incoming/x/b", b"b").unwrap();
    let e = fs
        .rename_noclobber("incoming/x/a", "incoming/x/b")
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(fs.read("incoming/x/b").unwrap(), b"b");
    // SFTP v3 carries no rename flags: even asked to overwrite, OpenSSH's
    // plain rename refuses an existing target. Replacing needs posix-rename.
    let sftp = fs.session().session().sftp().unwrap();
    let remote = |p: &str| std::path::PathBuf::from(fs.remote_path(p));
    assert!(sftp
        .rename(&remote("incoming/x/a"), &remote("incoming/x/b"), None)
        .is_err());
    assert_eq!(fs.read("incoming/x/b").unwrap(), b"b");
    fs.rename_noclobber("incoming/x/a", "incoming/x/c").unwrap();
    assert_eq!(fs.read("incoming/x/c").unwrap(), b"a");
    assert_eq!(
        fs.rename_noclobber("incoming/x/a", "incoming/x/d")
            .unwrap_err()
            .kind(),
        io::ErrorKind::NotFound
    );

    // What an agent makes is the agents' account's, readable by the master,
    // writable by nobody else (internal-sftp's -u 0022).
    use std::os::unix::fs::MetadataExt;
    let agent_uid = nix::unistd::User::from_name(AGENT_USER)
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    for (p, mode) in [("incoming/x/c", 0o644), ("incoming/x/y", 0o755)] {
        let m = std::fs::metadata(local.path(p)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (agent_uid, mode), "{p}");
    }

    // Listings are sorted and skip temporary files.
    std::fs::write(local.path("incoming/x/.tmp.hidden"), b"").unwrap();
    assert_eq!(fs.list("incoming/x").unwrap(), ["b", "c", "y"]);

    // Streams, bigger than one write buffer.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    {
        let mut w = fs.create_write("incoming/x/big.tmp").unwrap();
        for piece in data.chunks(1_234_567) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
    }
    assert_eq!(
        std::fs::read(local.path("incoming/x/big.tmp")).unwrap(),
        data
    );
    let mut back = Vec::new();
    fs.open_read("incoming/x/big.tmp")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data);

    std::fs::remove_file(local.path("incoming/x/.tmp.hidden")).unwrap();
    fs.remove_dir_all("incoming/x").unwrap();
    assert!(!local.path("incoming/x").exists());
}

const T0: Timestamp = Timestamp(1_900_000_000);

fn add_job(spool: &LocalSpool, id: &str, priority: u32) -> Entry {
    let text = format!(
        "id = \"{id}\"\npriority = {priority}\ntime_limit = \"1h\"\nmax_attempts = 3\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
    );
    master::add_job(spool, &text, Path::new("job.toml"), T0).unwrap()
}

/// Starts `n` threads, each with its own SSH session, released together.
fn race<T: Send + 'static>(
    server: &JobServer,
    n: usize,
    work: impl Fn(usize, &SftpSpool) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(n));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let fs = connect(server);
            let (barrier, work) = (barrier.clone(), work.clone());
            std::thread::spawn(move || {
                barrier.wait();
                work(i, &fs)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn exclusive_create_has_one_winner_across_sessions() {
    let (server, local) = start();
    for round in 0..5 {
        let path = format!("leases/race-{round}");
        let p = path.clone();
        let wins = race(&server, 8, move |i, fs| {
            fs.create_exclusive(&p, format!("agent-{i}\n").as_bytes())
                .unwrap()
        });
        let winners: Vec<usize> = (0..8).filter(|&i| wins[i]).collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let content = local.read(&path).unwrap();
        assert_eq!(content, format!("agent-{}\n", winners[0]).as_bytes());
    }
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(local.path("leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(TMP_PREFIX))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn claims_over_sftp_are_exclusive() {
    let (server, local) = start();
    for i in 0..40 {
        add_job(&local, &format!("job-{i:02}"), (i % 5) as u32);
    }
    let claims = race(&server, 8, |i, fs| {
        let agent = format!("agent-{i}");
        let mut got = Vec::new();
        while let Some(lease) = claim_next(fs, &agent, T0).unwrap() {
            got.push(lease);
        }
        got
    });
    let mut all: Vec<String> = claims.iter().flatten().map(|l| l.job.clone()).collect();
    all.sort();
    let expected: Vec<String> = (0..40).map(|i| format!("job-{i:02}")).collect();
    assert_eq!(all, expected, "every job claimed exactly once");
    // Each lease on disk is the one its claimer holds.
    for lease in claims.iter().flatten() {
        assert_eq!(check_lease(&local, lease).unwrap(), LeaseCheck::Held);
    }
}

#[test]
fn a_host_key_other_than_the_pinned_one_is_refused() {
    let (server, local) = start();
    add_job(&local, "job-a", 1);
    let other = tempfile::tempdir().unwrap();
    kiln_e2e::sshd::keygen(&other.path().join("k"), "impostor").unwrap();
    let pinned = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let mut cfg = server.agent_server();
    cfg.host_key = pinned.trim().to_string();

    let err = match SftpSpool::connect(&cfg, &SessionOptions::default()) {
        Ok(_) => panic!("connected despite a host key mismatch"),
        Err(e) => e,
    };
    let msg = err.to_string();
    let pinned_fp = HostKey::parse(&pinned).unwrap().fingerprint();
    let sshd = server.sshd();
    let server_fp = HostKey::parse(sshd.host_key_line()).unwrap().fingerprint();
    assert!(msg.contains(&pinned_fp), "{msg}");
    assert!(msg.contains(&server_fp), "{msg}");
    // The fingerprints are the ones OpenSSH prints.
    let keygen = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd.dir().join("host_key.pub"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keygen.stdout).contains(&server_fp));
    // Nothing was claimed, and the client never authenticated.
    assert!(local.list(LEASES).unwrap().is_empty());
    assert!(
        !sshd.log_tail().contains("Accepted publickey"),
        "{}",
        sshd.log_tail()
    );
}

const MIB: u64 = 1 << 20;

fn published_blake3(local: &LocalSpool, job: &str) -> String {
    file_blake3(&local.path(&format!("{}/{IMAGE_FILE}", image_dir(job)))).unwrap()
}

#[test]
fn upload_then_publish() {
    let (server, local) = start();
    let entry = add_job(&local, "job-a", 1);
    let work = tempfile::tempdir().unwrap();
    let (image, manifest) = random_image(
        work.path(),
        "job-a",
        &entry.blake3,
        20 * MIB as usize + 4321,
    )
    .unwrap();
    let log = work.path().join("job.log");
    std::fs::write(&log, "capture done\n").unwrap();

    let fs = connect(&server);
    let lease = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
    let opts = UploadOptions { chunk_size: MIB };
    let r = upload(
        &fs,
        &lease,
        &image,
        &manifest,
        Some(&log),
        &opts,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((r.chunks, r.sent, r.skipped), (21, 21, 0));

    let report = reap(&local, T0.plus(Duration::from_secs(60))).unwrap();
    assert_eq!(report.published, ["job-a"], "{report:?}");
    assert_eq!(published_blake3(&local, "job-a"), manifest.image_blake3);
    let image_dir = local.path(&image_dir("job-a"));
    assert_eq!(
        std::fs::read_to_string(image_dir.join(JOB_LOG)).unwrap(),
        "capture done\n"
    );
    assert!(local.exists(&history_path("job-a")).unwrap());
    assert!(read_job_list(&local).unwrap().get("job-a").is_none());
    // Agents cannot list what was published, but read an image by its id
    // (a deploy job names it), and it is the image that was checked.
    assert!(fs.list("images").is_err());
    let image = fs.read(&format!("images/job-a/{IMAGE_FILE}")).unwrap();
    assert_eq!(
        blake3::hash(&image).to_hex().to_string(),
        manifest.image_blake3
    );
    assert!(fs
        .write_atomic(&format!("images/job-a/{IMAGE_FILE}"), b"evil")
        .is_err());
}

#[test]
fn a_cut_upload_resumes_without_resending_whole_chunks() {
    let (mut server, local) = start();
    let entry = add_job(&local, "job-a", 1);
    let work = tempfile::tempdir().unwrap();
    let (image, manifest) =
        random_image(work.path(), "job-a", &entry.blake3, 20 * MIB as usize + 777).unwrap();
    let opts = UploadOptions { chunk_size: MIB };
    let lease = {
        let fs = connect(&server);
        claim_next(&fs, "agent-1", T0).unwrap().unwrap()
    };

    // Kill sshd, with its sessions, in the middle of chunk 9.
    let fs = connect(&server);
    let server_ref = std::cell::RefCell::new(&mut server);
    let err = upload(&fs, &lease, &image, &manifest, None, &opts, &mut |p| {
        if p.bytes_done > 9 * MIB + MIB / 2 && server_ref.borrow().sshd().is_running() {
            server_ref.borrow_mut().sshd_mut().kill();
        }
    })
    .unwrap_err();
    eprintln!("upload cut: {err}");
    drop(fs);
    let incoming = local.path(&incoming_dir("job-a", &lease.token));
    let whole = local.list(&incoming_dir("job-a", &lease.token)).unwrap();
    // Chunks 0 to 8 were whole; chunk 9 was in flight.
    assert_eq!(whole, (0..9).map(chunk_name).collect::<Vec<_>>());
    assert!(!incoming.join(MANIFEST).exists());

    server.sshd_mut().restart().unwrap();
    let fs = connect(&server);
    let r = upload(&fs, &lease, &image, &manifest, None, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        r.skipped,
        whole.len(),
        "chunks held whole are not sent again"
    );
    assert_eq!(r.sent, 21 - whole.len());

    let report = reap(&local, T0.plus(Duration::from_secs(60))).unwrap();
    assert_eq!(report.published, ["job-a"], "{report:?}");
    assert_eq!(published_blake3(&local, "job-a"), manifest.image_blake3);
}

#[test]
fn a_flipped_bit_is_refused_and_the_job_requeued() {
    let (server, local) = start();
    let entry = add_job(&local, "job-a", 1);
    let work = tempfile::tempdir().unwrap();
    let (image, manifest) =
        random_image(work.path(), "job-a", &entry.blake3, 3 * MIB as usize).unwrap();
    let fs = connect(&server);
    let lease = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
    let opts = UploadOptions { chunk_size: MIB };
    let r = upload(&fs, &lease, &image, &manifest, None, &opts, &mut |_| {}).unwrap();

    let chunk = local.path(&format!("{}/{}", r.dir, chunk_name(1)));
    let mut data = std::fs::read(&chunk).unwrap();
    data[12345] ^= 0x10;
    std::fs::write(&chunk, data).unwrap();

    let report = reap(&local, T0.plus(Duration::from_secs(60))).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(report.refused[0].2.contains("chunk 1"), "{report:?}");
    let entry = read_job_list(&local)
        .unwrap()
        .get("job-a")
        .cloned()
        .unwrap();
    assert_eq!(entry.state, EntryState::Queued);
    assert_eq!(entry.attempts, 1);
    assert!(!local.exists(&image_dir("job-a")).unwrap());
    assert_eq!(check_lease(&fs, &lease).unwrap(), LeaseCheck::Gone);
    // The next claim is the second attempt.
    let again = claim_next(&fs, "agent-2", T0).unwrap().unwrap();
    assert_eq!(again.attempt, 2);
}

#[test]
fn a_stale_tokens_upload_is_refused() {
    let (server, local) = start();
    let entry = add_job(&local, "job-a", 1);
    let work = tempfile::tempdir().unwrap();
    let (image, manifest) =
        random_image(work.path(), "job-a", &entry.blake3, 2 * MIB as usize + 5).unwrap();
    let opts = UploadOptions { chunk_size: MIB };
    let fs = connect(&server);
    let old = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
    // The master sees the lease: its deadline runs from here, by the
    // master's clock.
    reap(&local, T0).unwrap();
    upload(&fs, &old, &image, &manifest, None, &opts, &mut |_| {}).unwrap();
    let old_dir = local.path(&incoming_dir("job-a", &old.token));
    let saved = work.path().join("saved");
    copy_dir(&old_dir, &saved);
    // The upload was not finished when the lease ran out: no manifest yet.
    // (A complete one would be published first: uploads go before reaping.)
    std::fs::remove_file(old_dir.join(MANIFEST)).unwrap();

    // The lease runs out before the upload is complete: it is reaped.
    let late = T0.plus(Duration::from_secs(3601));
    let report = reap(&local, late).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert_eq!(report.released.len(), 1, "{report:?}");
    let new = claim_next(&fs, "agent-2", late).unwrap().unwrap();
    assert_ne!(new.token, old.token);

    // The old holder resumes: it finds its lease replaced and stops.
    let e = upload(&fs, &old, &image, &manifest, None, &opts, &mut |_| {}).unwrap_err();
    assert!(e.is_lease_lost(), "{e}");
    assert!(e.to_string().contains("agent-2"), "{e}");

    // Its complete upload lands anyway (written before the reap, say):
    // the master refuses it and the new lease stands.
    copy_dir(&saved, &old_dir);
    let report = reap(&local, late).unwrap();
    assert!(report.published.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert_eq!(report.refused[0].1, old.token);
    assert!(!old_dir.exists(), "{report:?}");
    assert_eq!(check_lease(&local, &new).unwrap(), LeaseCheck::Held);
    assert!(!local.exists(&image_dir("job-a")).unwrap());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn the_agent_key_does_sftp_in_the_spool_and_nothing_else() {
    let (server, local) = start();
    add_job(&local, "job-a", 1);
    // agent-key's own account of what it set up.
    let printed = server.agent_key_output();
    assert!(printed.contains("sshd -t accepts"), "{printed}");
    assert!(printed.contains("spool = \"/spool\""), "{printed}");
    assert!(
        printed.contains(&format!("user = \"{AGENT_USER}\"")),
        "{printed}"
    );

    // The spool works: a claim lands in the chroot's spool.
    let fs = connect(&server);
    let lease = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
    assert_eq!(check_lease(&local, &lease).unwrap(), LeaseCheck::Held);
    assert!(
        server.sshd().log_tail().contains(&format!(
            "Accepted publickey for {AGENT_USER} from 127.0.0.1"
        )),
        "{}",
        server.sshd().log_tail()
    );

    // An exec request runs nothing: the forced SFTP server answers instead.
    let session = fs.session().session();
    let mut ch = session.channel_session().unwrap();
    let ran = ch.exec("echo kiln-exec-marker > /tmp/kiln-exec-ran; echo kiln-exec-marker");
    let mut out = String::new();
    if ran.is_ok() {
        let _ = ch.read_to_string(&mut out);
        let _ = ch.stderr().read_to_string(&mut out);
        let _ = ch.wait_close();
        assert_ne!(ch.exit_status().unwrap_or(1), 0, "exec succeeded: {out}");
    }
    assert!(!out.contains("kiln-exec-marker"), "the command ran: {out}");
    assert!(out.contains("sftp connections only"), "{out}");
    assert!(!Path::new("/tmp/kiln-exec-ran").exists());
    // No forwarding either.
    assert!(
        session
            .channel_direct_tcpip("127.0.0.1", server.sshd().port(), None)
            .is_err(),
        "a TCP forward was opened"
    );

    // Paths outside the chroot are out of reach.
    let secret = server.sshd().dir().join("outside-secret");
    std::fs::write(&secret, "secret").unwrap();
    let escape = format!("../../../../..{}", secret.display());
    for path in [escape.as_str(), "../../../../../etc/passwd"] {
        assert!(fs.read(path).is_err(), "read {path} through the agent key");
    }
    let outside = std::env::temp_dir().join(format!("kiln-escape-{}", std::process::id()));
    let target = format!("../../../../..{}", outside.display());
    let _ = fs.write_atomic(&target, b"escaped");
    assert!(
        !outside.exists(),
        "wrote {} outside the chroot",
        outside.display()
    );
    // The master's files are read only, its own directories unseen.
    assert!(fs.read("jobs.toml").is_ok());
    assert!(fs.write_atomic("jobs.toml", b"").is_err());
    assert!(fs.remove("jobs/job-a.toml").is_err());
    assert!(fs.list("master").is_err());
}

#[test]
fn a_silent_link_is_an_error_not_a_hang() {
    let (server, _local) = start();
    let opts = SessionOptions {
        io_timeout: Duration::from_secs(2),
        ..SessionOptions::default()
    };
    let fs = connect_with(&server, &opts);
    fs.write_atomic("status/a.toml", b"one").unwrap();
    server.sshd().freeze(true);
    // The session's timeout fires: the read fails as timed out, it does not hang.
    let e = fs.read("status/a.toml").unwrap_err();
    server.sshd().freeze(false);
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
}
