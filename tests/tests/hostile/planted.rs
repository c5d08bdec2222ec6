//! Attacks sshd lets through, because agents must write these places, and
//! the master must neutralize. Each plays on the job its table entry names.

use super::*;

/// The name of the canary directory outside the chroot.
fn outside_name(c: &Ctx) -> String {
    c.canary_outside
        .path()
        .file_name()
        .expect("a temporary directory has a name")
        .to_string_lossy()
        .into_owned()
}

pub fn lease_job_climbs_to_chroot(c: &mut Ctx, job: &str) -> Held {
    let mut l = lease(job, "evil");
    mkdir(&mut c.raw, &sp("incoming/X"))?;
    mkdir(&mut c.raw, &sp(&format!("incoming/X/{}", l.token)))?;
    l.job = "X/../../..".into();
    c.put_lease(job, &l)
}

pub fn lease_job_climbs_out(c: &mut Ctx, job: &str) -> Held {
    mkdir(&mut c.raw, &sp("incoming/Y"))?;
    let mut l = lease(job, "evil");
    l.job = format!("Y/../../../../{}", outside_name(c));
    c.put_lease(job, &l)
}

pub fn lease_job_is_job_list(c: &mut Ctx, job: &str) -> Held {
    let mut l = lease(job, "evil");
    l.job = "../jobs.toml".into();
    c.put_lease(job, &l)
}

pub fn lease_token_climbs_out(c: &mut Ctx, job: &str) -> Held {
    mkdir(&mut c.raw, &sp(&format!("incoming/{job}")))?;
    let mut l = lease(job, "evil");
    l.token = format!("../../../../{}", outside_name(c));
    c.put_lease(job, &l)
}

pub fn lease_not_utf8(c: &mut Ctx, job: &str) -> Held {
    let mut text = format!("job = \"{job}\"\nagent = \"").into_bytes();
    text.extend_from_slice(b"\xff\xfe\x80\"\n");
    put_new(&mut c.raw, &sp(&format!("leases/{job}")), &text)
}

pub fn lease_malformed(c: &mut Ctx, job: &str) -> Held {
    put_new(&mut c.raw, &sp(&format!("leases/{job}")), b"job = [\n[[[")
}

/// The planted lease is gone from `leases/`: set aside rather than left to
/// block its job, and nothing outside the spool was touched on the way.
pub fn lease_set_aside(c: &mut Ctx, job: &str) -> Held {
    if c.local_path(&format!("leases/{job}")).exists() {
        return Err(format!(
            "leases/{job} is still there after the master's passes"
        ));
    }
    canaries_alive(c)
}

/// A lease filed as `job` that claims the honest agent's job.
pub fn lease_for_another_job(c: &mut Ctx, job: &str) -> Held {
    let mut l = lease(job, "evil");
    l.job = "victim".into();
    c.put_lease(job, &l)
}

pub fn other_jobs_lease_stands(c: &mut Ctx, job: &str) -> Held {
    let now = fs::read(c.local_path("leases/victim")).map_err(|e| format!("leases/victim: {e}"))?;
    if now != c.victim_lease {
        return Err("the honest agent's lease on victim changed".into());
    }
    let e = c.entry("victim")?.ok_or("victim left the job list")?;
    if e.attempts != 0 {
        return Err(format!("victim's attempts are {}", e.attempts));
    }
    lease_set_aside(c, job)
}

pub fn lease_attempt_max(c: &mut Ctx, job: &str) -> Held {
    let mut l = lease(job, "evil");
    l.attempt = u32::MAX;
    l.token = format!("{}-{}", u32::MAX, kiln_spool::spool::random_hex(12));
    c.put_lease(job, &l)
}

pub fn attempts_stay_sane(c: &mut Ctx, job: &str) -> Held {
    let e = c.entry(job)?.ok_or(format!("{job} left the job list"))?;
    if e.attempts > e.max_attempts {
        return Err(format!("attempts {} of {}", e.attempts, e.max_attempts));
    }
    Ok(())
}

pub fn lease_forever(c: &mut Ctx, job: &str) -> Held {
    let mut l = lease(job, "evil");
    l.deadline = Timestamp::MAX;
    l.attempt = 0;
    l.token = format!("0-{}", kiln_spool::spool::random_hex(12));
    c.put_lease(job, &l)
}

/// The job's time limit is seconds: the master ends the lease by its own
/// clock soon after, whatever deadline and attempt the file claims.
pub fn reaped_by_the_masters_clock(c: &mut Ctx, job: &str) -> Held {
    let started = Instant::now();
    let lease = c.local_path(&format!("leases/{job}"));
    let waited = wait_until(
        Duration::from_secs(60),
        &format!("the master to end the lease on {job}"),
        || {
            if !lease.exists() {
                return Ok(Some(()));
            }
            c.reap().map_err(anyhow::Error::msg)?;
            std::thread::sleep(Duration::from_millis(500));
            Ok(None)
        },
    );
    waited.map_err(|e| format!("{e:#}"))?;
    let e = c.entry(job)?.ok_or(format!("{job} left the job list"))?;
    if e.attempts != 1 {
        return Err(format!(
            "{job} has {} attempts after one expired lease (the file said 0)",
            e.attempts
        ));
    }
    eprintln!(
        "hostile: the lease on {job} ended {:.1?} into the check",
        started.elapsed()
    );
    Ok(())
}

/// Entries no job or upload can have, in every agents' directory: (path,
/// a directory?).
const STRAYS: [(&str, bool); 9] = [
    ("incoming/stray-file", false),
    ("incoming/stray-dir", true),
    ("incoming/victim/not-a-token", true),
    ("leases/stray-dir", true),
    ("leases/NOT A JOB", false),
    ("status/stray-file", false),
    ("status/dir.toml", true),
    ("logs/stray", false),
    ("logs/dir.log", true),
];

pub fn plant_strays(c: &mut Ctx, _: &str) -> Held {
    mkdir(&mut c.raw, &sp("incoming/victim"))?;
    for (p, dir) in STRAYS {
        let path = sp(p);
        if dir {
            mkdir(&mut c.raw, &path)?;
            put_new(&mut c.raw, &format!("{path}/inside"), b"stray")?;
        } else {
            put_new(&mut c.raw, &path, b"stray")?;
        }
    }
    Ok(())
}

/// Every pass succeeded (the good job's publication and the ended lease
/// are checked on their own) and the strays were set aside.
pub fn strays_gone_and_passes_go_on(c: &mut Ctx, _: &str) -> Held {
    for r in &c.runs {
        if r.what == "reap" {
            r.ok()?;
        }
    }
    let left: Vec<&str> = STRAYS
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| c.local_path(p).exists())
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still there after the passes: {left:?}"))
    }
}

pub fn huge_status(c: &mut Ctx, job: &str) -> Held {
    put_sparse(&mut c.raw, &sp(&format!("status/{job}.toml")), HUGE)
}

pub fn huge_lease(c: &mut Ctx, job: &str) -> Held {
    put_sparse(&mut c.raw, &sp(&format!("leases/{job}")), HUGE)
}

/// `show` and `list` with the huge file there, and every master command
/// so far, ran in bounded memory and time.
pub fn master_stays_small(c: &mut Ctx, job: &str) -> Held {
    c.master(&["show", job]);
    c.master(&["list"]);
    let heavy: Vec<String> = c
        .runs
        .iter()
        .filter(|r| r.max_rss_kib > MAX_RSS_KIB || r.took >= COMMAND_TIMEOUT)
        .map(|r| {
            format!(
                "`kiln-master {}` used {} MiB in {:.1?}",
                r.what,
                r.max_rss_kib >> 10,
                r.took
            )
        })
        .collect();
    if heavy.is_empty() {
        Ok(())
    } else {
        Err(heavy.join("; "))
    }
}

/// Set the title, clear the screen, write the clipboard, a C1 CSI, a
/// carriage return.
const ESCAPES: &str = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\u{9b}31m\r";

/// A lease and a heartbeat whose agent, server and message carry escapes.
pub fn escapes_in_status(c: &mut Ctx, job: &str) -> Held {
    plant_escapes(c, job, "capture")
}

/// The same with the phase carrying them too.
pub fn escapes_in_phase(c: &mut Ctx, job: &str) -> Held {
    plant_escapes(c, job, &format!("capture{ESCAPES}"))
}

fn plant_escapes(c: &mut Ctx, job: &str, phase: &str) -> Held {
    let l = lease(job, &format!("agent{ESCAPES}"));
    c.put_lease(job, &l)?;
    // Written by hand: every field is the attacker's.
    let now = Timestamp::now();
    let status = format!(
        "job = \"{job}\"\nagent = {}\ntoken = \"{}\"\nserver = {}\nstate = \"building\"\n\
         phase = {}\nprogress = 0.5\nmessage = {}\nstarted = \"{now}\"\nupdated = \"{now}\"\n",
        toml_string(&l.agent),
        l.token,
        toml_string(&format!("server{ESCAPES}")),
        toml_string(phase),
        toml_string(&format!("message{ESCAPES}")),
    );
    put_new(
        &mut c.raw,
        &sp(&format!("status/{job}.toml")),
        status.as_bytes(),
    )?;
    put_new(
        &mut c.raw,
        &sp(&format!("logs/{job}.log")),
        format!("log{ESCAPES}\n").as_bytes(),
    )
}

/// A TOML basic string holding `s`, control characters as `\uXXXX`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' | '\\' => out.push_str(&format!("\\{ch}")),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the planted escapes would do on a terminal: set its title or
/// clipboard (OSC ... BEL), clear it, a C1 CSI, a carriage return. The
/// master's own log colours (`ESC [ n m`) are not among them.
const DANGEROUS: [&str; 5] = ["\x1b]", "\x07", "\x1b[2J", "\u{9b}", "\r"];

/// None of the planted escapes reaches the operator's terminal from any
/// master command run so far, `list` and `show` included.
pub fn output_has_no_controls(c: &mut Ctx, job: &str) -> Held {
    c.master(&["list"]);
    c.master(&["show", job]);
    c.master(&["list", "--json"]);
    c.master(&["show", job, "--json"]);
    let mut bad = Vec::new();
    for r in &c.runs {
        for (stream, bytes) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
            let text = String::from_utf8_lossy(bytes);
            if let Some(line) = text
                .split('\n')
                .find(|l| DANGEROUS.iter().any(|d| l.contains(d)))
            {
                bad.push(format!(
                    "`kiln-master {}` {stream}: {}",
                    r.what,
                    line.escape_debug()
                ));
            }
        }
    }
    bad.dedup();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// A complete upload for `job` under a lease of the attacker's, one chunk
/// whose list is right, the manifest changed by `edit`, and a publication
/// record of its own making beside it.
fn plant_upload(c: &mut Ctx, job: &str, edit: fn(&mut ImageManifest)) -> Held {
    let entry = c
        .entry(job)?
        .ok_or(format!("{job} is not in the job list"))?;
    let l = lease(job, "evil");
    c.put_lease(job, &l)?;
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let hash = blake3::hash(&data).to_hex().to_string();
    let dir = sp(&format!("incoming/{job}/{}", l.token));
    mkdir(&mut c.raw, &sp(&format!("incoming/{job}")))?;
    mkdir(&mut c.raw, &dir)?;
    put_new(&mut c.raw, &format!("{dir}/{}", chunk_name(0)), &data)?;
    let chunks = ChunkList {
        chunk_size: 4096,
        total_size: 4096,
        chunks: vec![Chunk {
            size: 4096,
            blake3: hash.clone(),
        }],
    };
    put_new(
        &mut c.raw,
        &format!("{dir}/{CHUNKS}"),
        chunks.to_toml().as_bytes(),
    )?;
    let now = Timestamp::now();
    let mut manifest = ImageManifest {
        format: "raw.zst".into(),
        job: job.into(),
        job_blake3: entry.blake3.clone(),
        agent: "evil".into(),
        disk_size: 4096,
        block_size: 4096,
        bytes_read: 4096,
        image_size: 4096,
        image_blake3: hash,
        payloads: vec![],
        started: now,
        finished: now,
        phases: vec![],
        ranges: vec![],
        generalized: Vec::new(),
        provenance: None,
    };
    edit(&mut manifest);
    let record = Published {
        job: job.into(),
        token: l.token.clone(),
        agent: "evil".into(),
        published: now,
        image_size: 4096,
        image_blake3: manifest.image_blake3.clone(),
        disk_size: 4096,
    };
    put_new(
        &mut c.raw,
        &format!("{dir}/published.toml"),
        toml::to_string(&record)
            .expect("a record serializes")
            .as_bytes(),
    )?;
    put_new(
        &mut c.raw,
        &format!("{dir}/{MANIFEST}"),
        manifest.to_toml().as_bytes(),
    )
}

pub fn forged_upload(c: &mut Ctx, job: &str) -> Held {
    plant_upload(c, job, |m| m.image_blake3 = "0".repeat(64))
}

pub fn upload_for_other_job_file(c: &mut Ctx, job: &str) -> Held {
    plant_upload(c, job, |m| {
        m.job_blake3 = blake3::hash(b"another job file").to_hex().to_string()
    })
}

pub fn not_published(c: &mut Ctx, job: &str) -> Held {
    if c.local_path(&format!("images/{job}")).exists() {
        return Err(format!("images/{job} exists"));
    }
    if c.local_path(&format!("history/{job}.toml")).exists() {
        return Err(format!("history/{job}.toml exists: the job counts as done"));
    }
    if c.entry(job)?.is_none() {
        return Err(format!("{job} left the job list"));
    }
    Ok(())
}
