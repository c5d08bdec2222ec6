//! Attacks sshd must refuse: the agents' account may read the master's
//! files, write only the agents' directories, and nothing more.

use super::*;

pub fn overwrite_job_list(c: &mut Ctx) -> Held {
    let evil = b"[[job]]\nid = \"evil\"\n";
    all_refused(vec![
        t(
            "truncate and write",
            c.raw.put(&sp("jobs.toml"), TRUNC, evil),
        ),
        t("write in place", c.raw.put(&sp("jobs.toml"), 0, evil)),
        t(
            "append",
            c.raw
                .put(&sp("jobs.toml"), kiln_e2e::raw_sftp::APPEND, evil),
        ),
    ])
}

pub fn replace_job_list(c: &mut Ctx) -> Held {
    let from = format!("{S}/status/evil-list.toml");
    put_new(&mut c.raw, &from, b"[[job]]\nid = \"evil\"\n")?;
    let r = all_refused(vec![
        t(
            "posix-rename over jobs.toml",
            c.raw.posix_rename(&from, &sp("jobs.toml")),
        ),
        t(
            "rename over jobs.toml",
            c.raw.rename(&from, &sp("jobs.toml")),
        ),
    ]);
    let _ = c.raw.remove(&from);
    r
}

pub fn remove_job_list(c: &mut Ctx) -> Held {
    all_refused(vec![
        t("delete", c.raw.remove(&sp("jobs.toml"))),
        t(
            "rename",
            c.raw.rename(&sp("jobs.toml"), &sp("status/stolen.toml")),
        ),
        t(
            "posix-rename",
            c.raw
                .posix_rename(&sp("jobs.toml"), &sp("status/stolen.toml")),
        ),
    ])
}

pub fn rewrite_job_file(c: &mut Ctx) -> Held {
    let evil = b"id = \"victim\"\n[[steps]]\nname = \"own\"\nrun = \"id\"\nwhere = \"agent\"\n";
    let from = format!("{S}/status/evil-job.toml");
    put_new(&mut c.raw, &from, evil)?;
    let r = all_refused(vec![
        t(
            "truncate and write",
            c.raw.put(&sp("jobs/victim.toml"), TRUNC, evil),
        ),
        t(
            "write in place",
            c.raw.put(&sp("jobs/victim.toml"), 0, evil),
        ),
        t(
            "posix-rename over it",
            c.raw.posix_rename(&from, &sp("jobs/victim.toml")),
        ),
    ]);
    let _ = c.raw.remove(&from);
    r
}

pub fn remove_job_file(c: &mut Ctx) -> Held {
    all_refused(vec![
        t("delete", c.raw.remove(&sp("jobs/victim.toml"))),
        t(
            "rename",
            c.raw.rename(&sp("jobs/victim.toml"), &sp("jobs/gone.toml")),
        ),
        t(
            "rename out",
            c.raw
                .rename(&sp("jobs/victim.toml"), &sp("status/victim.toml")),
        ),
    ])
}

pub fn add_evil_job(c: &mut Ctx) -> Held {
    let evil = b"id = \"evil\"\npriority = 1000\n[disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n[[steps]]\nname = \"own\"\nrun = \"id\"\nwhere = \"agent\"\n";
    let from = format!("{S}/status/evil.toml");
    put_new(&mut c.raw, &from, evil)?;
    let r = all_refused(vec![
        t(
            "create",
            c.raw.put(&sp("jobs/evil.toml"), CREAT | EXCL, evil),
        ),
        t("rename in", c.raw.rename(&from, &sp("jobs/evil.toml"))),
        t("mkdir", c.raw.mkdir(&sp("jobs/evil"))),
    ]);
    let _ = c.raw.remove(&from);
    r
}

pub fn tamper_payload(c: &mut Ctx) -> Held {
    let p = format!("{S}/payloads/{PAYLOAD}");
    all_refused(vec![
        t("truncate and write", c.raw.put(&p, TRUNC, b"evil")),
        t("write in place", c.raw.put(&p, 0, b"evil")),
        t("delete", c.raw.remove(&p)),
        t("rename", c.raw.rename(&p, &sp("payloads/old.tar"))),
    ])
}

pub fn add_payload(c: &mut Ctx) -> Held {
    all_refused(vec![
        t(
            "create",
            c.raw.put(&sp("payloads/evil.tar"), CREAT | EXCL, b"evil"),
        ),
        t("mkdir", c.raw.mkdir(&sp("payloads/evil"))),
    ])
}

/// Agents read a published image by its id (a deploy job names it), but
/// cannot list which images there are.
pub fn list_images(c: &mut Ctx) -> Held {
    let list = c.raw.list(&sp("images")).map(|r| r.map(|_| ()));
    all_refused(vec![t("list images/", list)])
}

pub fn write_images(c: &mut Ctx) -> Held {
    all_refused(vec![
        t("mkdir images/victim", c.raw.mkdir(&sp("images/victim"))),
        t(
            "overwrite an image",
            c.raw
                .put(&format!("{S}/images/old/{IMAGE_FILE}"), TRUNC, b"evil"),
        ),
        t("remove an image", c.raw.rmdir(&sp("images/old"))),
    ])
}

pub fn plant_publication(c: &mut Ctx) -> Held {
    let record = Published {
        job: "victim".into(),
        token: "1-000000000000000000000000".into(),
        agent: "evil".into(),
        published: Timestamp::now(),
        image_size: 4,
        image_blake3: blake3::hash(b"evil").to_hex().to_string(),
        disk_size: 4,
    };
    let text = toml::to_string(&record).expect("a record serializes");
    all_refused(vec![
        t("mkdir images/victim", c.raw.mkdir(&sp("images/victim"))),
        t(
            "write images/victim/published.toml",
            c.raw
                .put(&sp("images/victim/published.toml"), CREAT, text.as_bytes()),
        ),
    ])
}

pub fn touch_history(c: &mut Ctx) -> Held {
    let list = c.raw.list(&sp("history")).map(|r| r.map(|_| ()));
    let read = c
        .raw
        .get(&sp("history/old.toml"), 1 << 20)
        .map(|r| r.map(|_| ()));
    all_refused(vec![
        t("list history/", list),
        t("read history/old.toml", read),
        t(
            "write history/victim.toml",
            c.raw.put(&sp("history/victim.toml"), CREAT, b"evil"),
        ),
    ])
}

pub fn read_master_dir(c: &mut Ctx) -> Held {
    let list = c.raw.list(&sp("master")).map(|r| r.map(|_| ()));
    let read = c.raw.get(&sp("master/lock"), 1024).map(|r| r.map(|_| ()));
    all_refused(vec![t("list master/", list), t("read master/lock", read)])
}

pub fn remove_master_lock(c: &mut Ctx) -> Held {
    all_refused(vec![
        t("delete master/lock", c.raw.remove(&sp("master/lock"))),
        t(
            "overwrite master/lock",
            c.raw.put(&sp("master/lock"), TRUNC, b""),
        ),
        t(
            "rename master/",
            c.raw.rename(&sp("master"), &sp("status/master")),
        ),
        t("rmdir master/", c.raw.rmdir(&sp("master"))),
        t(
            "plant the old lock",
            c.raw.put(&sp(".master.lock"), CREAT, b""),
        ),
    ])
}

pub fn remove_spool_dirs(c: &mut Ctx) -> Held {
    let mut tries = Vec::new();
    for d in [
        "jobs", "payloads", "leases", "status", "incoming", "logs", "images", "history",
    ] {
        tries.push(t(format!("rmdir {d}/"), c.raw.rmdir(&format!("{S}/{d}"))));
        tries.push(t(
            format!("rename {d}/"),
            c.raw.rename(&format!("{S}/{d}"), &format!("{S}/{d}.old")),
        ));
    }
    tries.push(t("rename the spool", c.raw.rename(S, "/spool.old")));
    all_refused(tries)
}

pub fn make_top_level_entries(c: &mut Ctx) -> Held {
    all_refused(vec![
        t("mkdir in the spool", c.raw.mkdir(&sp("evil"))),
        t(
            "file in the spool",
            c.raw.put(&sp("evil.toml"), CREAT, b"evil"),
        ),
        t("mkdir in the chroot", c.raw.mkdir("/evil")),
        t("file in the chroot", c.raw.put("/evil", CREAT, b"evil")),
        t(
            "write the chroot's canary",
            c.raw.put("/canary/file", TRUNC, b"evil"),
        ),
        t("delete the chroot's canary", c.raw.remove("/canary/file")),
    ])
}

pub fn remove_master_lease(c: &mut Ctx) -> Held {
    let p = format!("{S}/leases/masterlease");
    let from = format!("{S}/status/lease.toml");
    put_new(
        &mut c.raw,
        &from,
        lease("masterlease", "evil").to_toml().as_bytes(),
    )?;
    let r = all_refused(vec![
        t("delete", c.raw.remove(&p)),
        t("rename", c.raw.rename(&p, &sp("leases/gone"))),
        t("overwrite", c.raw.put(&p, TRUNC, b"evil")),
        t("posix-rename over it", c.raw.posix_rename(&from, &p)),
    ]);
    let _ = c.raw.remove(&from);
    r
}

pub fn master_lease_intact(c: &mut Ctx) -> Held {
    // The master's passes may end it; an agent may not have changed it.
    match fs::read(c.local_path("leases/masterlease")) {
        Ok(b) if b == c.master_lease => Ok(()),
        Ok(_) => Err("leases/masterlease changed".into()),
        Err(_) => Ok(()),
    }
}

// ----- links, attributes, copies -----

/// Paths where a link attack would leave its link.
const LINKS: [&str; 8] = [
    "leases/sym",
    "incoming/victim",
    "status/victim.toml",
    "logs/victim.log",
    "leases/hard",
    "status/hard.toml",
    "incoming/hard",
    "status/own-link.toml",
];

pub fn make_symlinks(c: &mut Ctx) -> Held {
    let mut tries = Vec::new();
    for (link, target) in [
        ("leases/sym", "../jobs.toml"),
        ("incoming/victim", "/etc"),
        ("status/victim.toml", "/dev/zero"),
        ("logs/victim.log", "/etc/ssh/ssh_host_ed25519_key"),
        ("status/own-link.toml", "../jobs/victim.toml"),
    ] {
        let link = format!("{S}/{link}");
        // OpenSSH reads the two paths in the reverse of the draft's order.
        tries.push(t(
            format!("symlink {link} -> {target}"),
            c.raw.symlink(target, &link),
        ));
        tries.push(t(
            format!("symlink {link} -> {target} (draft order)"),
            c.raw.symlink(&link, target),
        ));
    }
    all_refused(tries)
}

pub fn make_hard_links(c: &mut Ctx) -> Held {
    put_new(&mut c.raw, &sp("status/own.toml"), b"mine")?;
    let mut tries = Vec::new();
    for (existing, link) in [
        ("jobs.toml", "leases/hard"),
        ("jobs/victim.toml", "status/hard.toml"),
        ("payloads/base.tar", "incoming/hard"),
        ("status/own.toml", "status/own-link.toml"),
        ("leases/victim", "status/hard.toml"),
    ] {
        tries.push(t(
            format!("hardlink {link} -> {existing}"),
            c.raw
                .hardlink(&format!("{S}/{existing}"), &format!("{S}/{link}")),
        ));
    }
    let r = all_refused(tries);
    let _ = c.raw.remove(&sp("status/own.toml"));
    r
}

pub fn no_links_left(c: &mut Ctx) -> Held {
    let left: Vec<&str> = LINKS
        .iter()
        .copied()
        .filter(|l| {
            fs::symlink_metadata(c.local_path(l))
                .is_ok_and(|m| m.file_type().is_symlink() || (m.is_file() && m.nlink() > 1))
        })
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("links left: {left:?}"))
    }
}

pub fn change_attributes(c: &mut Ctx) -> Held {
    let own = format!("{S}/status/own.toml");
    put_new(&mut c.raw, &own, b"mine")?;
    let mut tries = vec![
        t("setstat own file 04777", c.raw.setstat(&own, 0o4777)),
        t("lsetstat own file 0777", c.raw.lsetstat(&own, 0o777)),
        t("setstat leases/ 0777", c.raw.setstat(&sp("leases"), 0o777)),
        t(
            "setstat jobs.toml 0666",
            c.raw.setstat(&sp("jobs.toml"), 0o666),
        ),
    ];
    match c.raw.open_file(&own, WRITE) {
        Ok(Ok(h)) => {
            tries.push(t("fsetstat own file 0777", c.raw.fsetstat(&h, 0o777)));
            let _ = c.raw.close(&h);
        }
        other => return Err(format!("opening {own}: {other:?}")),
    }
    let r = all_refused(tries);
    let mode = fs::metadata(c.local_path("status/own.toml")).map(|m| m.mode() & 0o7777);
    let _ = c.raw.remove(&own);
    r?;
    match mode {
        Ok(0o644) => Ok(()),
        other => Err(format!("status/own.toml's mode is {other:?}")),
    }
}

pub fn copy_data(c: &mut Ctx) -> Held {
    let to = format!("{S}/status/copy.toml");
    let from = c.raw.open_file(&sp("jobs.toml"), READ);
    let dest = c.raw.open_file(&to, WRITE | CREAT | TRUNC);
    let (Ok(Ok(from)), Ok(Ok(dest))) = (from, dest) else {
        return Err("opening the handles for copy-data failed".into());
    };
    let r = was_refused("copy-data", c.raw.copy_data(&from, 0, &dest));
    let _ = c.raw.close(&from);
    let _ = c.raw.close(&dest);
    let copied = fs::metadata(c.local_path("status/copy.toml")).map_or(0, |m| m.len());
    let _ = c.raw.remove(&to);
    r?;
    if copied != 0 {
        return Err(format!("copy-data wrote {copied} bytes"));
    }
    Ok(())
}

// ----- beyond SFTP -----

const EXEC_MARKER: &str = "/tmp/kiln-hostile-exec-ran";

pub fn exec_command(c: &mut Ctx) -> Held {
    let ssh = c.session()?;
    let mut ch = ssh
        .session()
        .channel_session()
        .map_err(|e| format!("opening a channel: {e}"))?;
    let mut out = String::new();
    if ch
        .exec(&format!("touch {EXEC_MARKER}; echo kiln-exec-ran"))
        .is_ok()
    {
        let _ = ch.read_to_string(&mut out);
        let _ = ch.stderr().read_to_string(&mut out);
        let _ = ch.wait_close();
        if ch.exit_status().unwrap_or(1) == 0 {
            return Err(format!("exec exited 0: {out}"));
        }
    }
    if out.contains("kiln-exec-ran") {
        return Err(format!("the command ran: {out}"));
    }
    Ok(())
}

pub fn no_exec_marker(_: &mut Ctx) -> Held {
    if Path::new(EXEC_MARKER).exists() {
        return Err(format!("{EXEC_MARKER} exists"));
    }
    Ok(())
}

pub fn ask_for_shell(c: &mut Ctx) -> Held {
    let ssh = c.session()?;
    let mut ch = ssh
        .session()
        .channel_session()
        .map_err(|e| format!("opening a channel: {e}"))?;
    if ch.request_pty("xterm", None, None).is_ok() {
        return Err("a pty was granted".into());
    }
    let mut ch = ssh
        .session()
        .channel_session()
        .map_err(|e| format!("opening a channel: {e}"))?;
    if ch.shell().is_ok() {
        let _ = ch.write_all(b"echo kiln-shell-ran\nexit\n");
        let mut out = String::new();
        let _ = ch.read_to_string(&mut out);
        let _ = ch.wait_close();
        if out.contains("kiln-shell-ran") {
            return Err(format!("a shell ran: {out}"));
        }
        if !out.contains("sftp connections only") {
            return Err(format!("the shell request got: {out:?}"));
        }
    }
    Ok(())
}

pub fn forward_ports(c: &mut Ctx) -> Held {
    let ssh = c.session()?;
    let port = c.server.sshd().port();
    if ssh
        .session()
        .channel_direct_tcpip("127.0.0.1", port, None)
        .is_ok()
    {
        return Err("a local forward to 127.0.0.1 was opened".into());
    }
    if ssh
        .session()
        .channel_forward_listen(0, Some("127.0.0.1"), None)
        .is_ok()
    {
        return Err("a remote forward was granted".into());
    }
    Ok(())
}

// ----- out of the spool by path -----

pub fn read_by_traversal(c: &mut Ctx) -> Held {
    let outside = c.canary_outside.path().join("file");
    let climb = format!("../../../../../../..{}", outside.display());
    let mut tries = Vec::new();
    for p in [
        "../../etc/passwd",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "/../../etc/shadow",
        "/etc/ssh/ssh_host_ed25519_key",
        climb.as_str(),
    ] {
        tries.push(t(
            format!("read {p}"),
            c.raw.get(p, 1 << 20).map(|r| r.map(|_| ())),
        ));
    }
    all_refused(tries)
}

pub fn write_by_traversal(c: &mut Ctx) -> Held {
    let name = format!("kiln-hostile-{}", std::process::id());
    let tmp_target = std::env::temp_dir().join(&name);
    let outside_target = c.canary_outside.path().join(&name);
    c.must_not_exist.push(tmp_target.clone());
    c.must_not_exist.push(outside_target.clone());
    let mut tries = Vec::new();
    for p in [
        format!("../../../../../..{}", tmp_target.display()),
        format!("../../../../../..{}", outside_target.display()),
        format!("{S}/../../../../../..{}", outside_target.display()),
        "../canary/evil".to_string(),
        format!("{S}/../evil"),
    ] {
        tries.push(t(format!("write {p}"), c.raw.put(&p, CREAT, b"escaped")));
        tries.push(t(format!("mkdir {p}.d"), c.raw.mkdir(&format!("{p}.d"))));
    }
    all_refused(tries)
}

pub fn nothing_outside_written(c: &mut Ctx) -> Held {
    let there: Vec<String> = c
        .must_not_exist
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if there.is_empty() {
        Ok(())
    } else {
        Err(format!("written outside the spool: {there:?}"))
    }
}
