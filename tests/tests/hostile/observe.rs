//! What the suite looks at besides the attacks themselves: the master's
//! commands (output, peak memory, time), the master's files, the job list
//! and the canaries outside the spool.

use super::*;

/// One run of a kiln-master command.
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub max_rss_kib: i64,
    pub took: Duration,
}

impl Run {
    pub fn ok(&self) -> Held {
        if !self.status.success() {
            return Err(format!(
                "`kiln-master {}` failed ({}): {}{}",
                self.what,
                self.status,
                String::from_utf8_lossy(&self.stdout),
                String::from_utf8_lossy(&self.stderr)
            ));
        }
        Ok(())
    }
}

pub fn canaries_alive(c: &Ctx) -> Held {
    for (p, want) in &c.canaries {
        match fs::read(p) {
            Ok(got) if got == *want => {}
            Ok(_) => return Err(format!("{} changed", p.display())),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Ok(())
}

/// Owner, mode and content of every master file, and the chroot's listing.
pub fn fingerprint(c: &Ctx) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let spool = c.server.spool();
    let mut stack = vec![PathBuf::from("jobs.toml")];
    for d in ["jobs", "payloads", "images", "history", "master"] {
        stack.push(PathBuf::from(d));
    }
    stack.push(PathBuf::from("leases/masterlease"));
    stack.push(PathBuf::from("leases/victim"));
    while let Some(rel) = stack.pop() {
        let path = spool.join(&rel);
        let Ok(m) = fs::symlink_metadata(&path) else {
            out.insert(rel.display().to_string(), "missing".into());
            continue;
        };
        let mut what = format!("{:o} {}:{}", m.mode(), m.uid(), m.gid());
        if m.is_dir() {
            for e in fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(rel.join(e.file_name()));
            }
        } else if m.is_file() {
            what.push_str(&format!(" {}", file_blake3(&path).unwrap_or_default()));
        }
        out.insert(rel.display().to_string(), what);
    }
    let mut chroot: Vec<String> = fs::read_dir(c.server.chroot())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    chroot.sort();
    out.insert("(chroot)".into(), chroot.join(" "));
    out
}

pub fn fingerprint_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}

/// The job list lost the published job and nothing else, and each entry's
/// identity (priority, order, limits, pinned hash) is what the master set.
pub fn job_list_intact(c: &Ctx) -> Held {
    let after = c.job_list()?;
    let key = |e: &Entry| {
        (
            e.priority,
            e.seq,
            e.max_attempts,
            e.time_limit.to_string(),
            e.blake3.clone(),
        )
    };
    let mut problems = Vec::new();
    for before in &c.jobs_before.jobs {
        match after.get(&before.id) {
            None if before.id == "good" => {}
            None => problems.push(format!("{} left the job list", before.id)),
            Some(e) if key(e) != key(before) => {
                problems.push(format!("{} changed: {e:?}", before.id))
            }
            Some(_) => {}
        }
    }
    for e in &after.jobs {
        if c.jobs_before.get(&e.id).is_none() {
            problems.push(format!("{} joined the job list", e.id));
        }
    }
    for (id, bytes) in &c.job_files_before {
        match fs::read(c.local_path(&format!("jobs/{id}.toml"))) {
            Ok(b) if b == *bytes => {}
            Err(_) if id == "good" => {}
            _ => problems.push(format!("jobs/{id}.toml changed")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Runs kiln-master with its output in files and waits for it with
/// wait4(2), which reports its peak memory; kills it after [`COMMAND_TIMEOUT`].
#[expect(
    clippy::zombie_processes,
    reason = "wait4 reaps the child, which Child::wait cannot do with its rusage"
)]
pub fn run_measured(server: &JobServer, args: &[&str]) -> Run {
    let what = args.join(" ");
    let outputs = tempfile::tempdir().expect("a temporary directory");
    let (out_path, err_path) = (outputs.path().join("out"), outputs.path().join("err"));
    let mut cmd = master_command(server.spool(), args).expect("kiln-master is built");
    cmd.stdout(Stdio::from(
        fs::File::create(&out_path).expect("stdout file"),
    ))
    .stderr(Stdio::from(
        fs::File::create(&err_path).expect("stderr file"),
    ));
    let start = Instant::now();
    let mut child = cmd.spawn().expect("kiln-master starts");
    let pid = child.id() as nix::libc::pid_t;
    let (status, rss) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; both pointers are live.
        let r = unsafe { nix::libc::wait4(pid, &mut status, nix::libc::WNOHANG, &mut usage) };
        if r == pid {
            break (ExitStatus::from_raw(status), usage.ru_maxrss);
        }
        if start.elapsed() >= COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break (ExitStatus::from_raw(9), 0);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        what,
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
        max_rss_kib: rss,
        took: start.elapsed(),
    }
}
