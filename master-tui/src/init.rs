//! `kiln-master init`: makes a spool, or repairs one.
//!
//! With `--agent-user USER`, run as root, the spool has two identities: it
//! belongs to the master's account, and agents log in as USER, which sshd
//! chroots into the spool's parent (see [`crate::chroot`]). Each directory
//! gets the owner, group and mode its [`Access`] in [`LAYOUT`] asks for, so
//! that agents can write only where agents must. Run again, it puts back
//! what has drifted and prints each change.
//!
//! Without `--agent-user` the spool has one identity, as for local use and
//! tests: whoever can write it can write all of it.

use std::fs::{self, DirBuilder};
use std::io::Write;
use std::os::unix::fs::{lchown, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kiln_spool::spool::{Access, JOB_LIST, LAYOUT, SIGNING_KEY, TMP_PREFIX};
use kiln_spool::LocalSpool;
use nix::unistd::{Gid, Group, Uid, User};

use crate::chroot::{check_chroot, check_chroot_down_to, ChrootLayout};
use crate::command;

/// The shell of the agents' account: sshd runs internal-sftp in-process,
/// so no shell ever runs, and none would if the forced command went away.
pub const NOLOGIN: &str = "/usr/sbin/nologin";
/// Mode of the spool root and of `jobs.toml`.
pub const ROOT_MODE: u32 = 0o755;
pub const JOB_LIST_MODE: u32 = 0o644;

/// An account on the job server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
}

impl Account {
    fn lookup(name: &str) -> Result<Option<Account>> {
        let user =
            User::from_name(name).with_context(|| format!("looking up the account {name}"))?;
        Ok(user.map(|u| Account {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }))
    }

    fn current() -> Result<Account> {
        let uid = Uid::effective();
        let u = User::from_uid(uid)
            .context("looking up the current account")?
            .with_context(|| format!("uid {uid} has no passwd entry"))?;
        Ok(Account {
            name: u.name,
            uid: uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }
}

/// What `init` was asked for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub spool: PathBuf,
    /// The agents' account; `None` for a spool with one identity.
    pub agent_user: Option<String>,
    /// The account the spool belongs to; default the one running init.
    pub master_user: Option<String>,
}

pub fn run(opts: &InitOptions, out: &mut dyn Write) -> Result<()> {
    match &opts.agent_user {
        None => init_one_identity(&opts.spool, out),
        Some(agents) => init_two_identities(&opts.spool, agents, opts.master_user.as_deref(), out),
    }
}

/// The spool as it always was: directories and an empty job list, owned by
/// whoever runs this.
fn init_one_identity(spool: &Path, out: &mut dyn Write) -> Result<()> {
    fs::create_dir_all(spool).with_context(|| format!("creating {}", spool.display()))?;
    let local = LocalSpool::new(spool);
    let _lock = local
        .lock()
        .with_context(|| format!("locking {}", spool.display()))?;
    kiln_spool::master::init(&local)?;
    writeln!(out, "spool ready at {}", spool.display())?;
    signing_key(&local, out)?;
    writeln!(
        out,
        "one identity: whoever can write the spool can write all of it. For agents \
         on a network, run `kiln-master --spool {} init --agent-user kiln-agent` as \
         root (see the README's set-up)",
        spool.display()
    )?;
    Ok(())
}

fn init_two_identities(
    spool: &Path,
    agent_user: &str,
    master_user: Option<&str>,
    out: &mut dyn Write,
) -> Result<()> {
    if !Uid::effective().is_root() {
        bail!(
            "init --agent-user runs as root: it creates the agents' account and \
             sets owners and modes (run it with sudo)"
        );
    }
    check_account_name(agent_user).map_err(|p| anyhow::anyhow!("--agent-user {p}"))?;
    let mut changes = Changes::default();
    let master = match master_user {
        Some(name) => Account::lookup(name)?.with_context(|| {
            format!(
                "--master-user {name}: no such account; create it first (useradd --system {name})"
            )
        })?,
        None => Account::current()?,
    };
    if master.name == agent_user {
        bail!(
            "--agent-user {agent_user} is also the master's account; agents need an \
             account of their own"
        );
    }

    let layout = ChrootLayout::resolve(spool)?;
    // Nothing is made under a parent that sshd would refuse.
    if let Some(existing) = layout.chroot.ancestors().find(|p| p.exists()) {
        check_chroot_down_to(existing, &layout.chroot)?;
    }
    create_missing_ancestors(&layout.chroot, &mut changes)?;
    let layout = ChrootLayout::resolve(&layout.spool)?;
    check_chroot(&layout.chroot)?;

    let agents = ensure_agent_account(agent_user, &mut changes)?;
    if agents.uid == 0 || agents.gid == 0 || agents.uid == master.uid {
        bail!(
            "the account {} (uid {}, gid {}) shares root's or the master's identity; \
             agents need an unprivileged account of their own",
            agents.name,
            agents.uid,
            agents.gid
        );
    }

    apply_layout(&layout.spool, &master, &agents, &mut changes)?;

    let local = LocalSpool::new(&layout.spool);
    {
        let _lock = local
            .lock()
            .with_context(|| format!("locking {}", layout.spool.display()))?;
        kiln_spool::master::init(&local)?;
    }
    // Made before the repair below, which gives it to the master's account.
    signing_key(&local, out)?;
    repair_master_files(&layout.spool, &master, &mut changes)?;

    for line in &changes.0 {
        writeln!(out, "{line}")?;
    }
    if changes.0.is_empty() {
        writeln!(out, "nothing to change: the layout was right")?;
    }
    writeln!(
        out,
        "spool {} belongs to {}; agents log in as {} (group {}), chrooted into {}, \
         and name the spool \"{}\"",
        layout.spool.display(),
        master.name,
        agents.name,
        group_name(agents.gid),
        layout.chroot.display(),
        layout.spool_in_chroot
    )?;
    for note in chroot_neighbours(&layout)? {
        writeln!(out, "note: {note}")?;
    }
    writeln!(
        out,
        "next: kiln-master --spool {} agent-key --out /etc/kiln/agent-key --agent-user {}",
        layout.spool.display(),
        agents.name
    )?;
    Ok(())
}

/// Makes the image signing key if the spool has none, and says which key
/// signs and where agents and `ssh-keygen` get its line.
fn signing_key(spool: &LocalSpool, out: &mut dyn Write) -> Result<()> {
    let (key, created) = kiln_spool::master::signing::load_or_create_key(spool)?;
    writeln!(
        out,
        "{} image signing key {SIGNING_KEY} ({}); `kiln-master signer` prints the \
         line for ssh-keygen -Y verify and the agents' image_signers",
        if created { "made the" } else { "kept the" },
        key.fingerprint()
    )?;
    Ok(())
}

/// What init changed, one line each, as it prints them.
#[derive(Debug, Default)]
pub struct Changes(pub Vec<String>);

impl Changes {
    fn push(&mut self, line: String) {
        tracing::info!("{line}");
        self.0.push(line);
    }
}

/// An account name that useradd takes and a `Match User` line cannot
/// misread as a pattern.
pub fn check_account_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = name.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an account name like kiln-agent ([a-z_][a-z0-9_-]*, at most 32)"
        ))
    }
}

/// Makes the chroot and any missing directory above it: root's, mode 0755.
fn create_missing_ancestors(chroot: &Path, changes: &mut Changes) -> Result<()> {
    let mut missing: Vec<&Path> = chroot.ancestors().take_while(|p| !p.exists()).collect();
    missing.reverse();
    for dir in missing {
        DirBuilder::new()
            .mode(ROOT_MODE)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // The umask may have taken bits away.
        fs::set_permissions(dir, fs::Permissions::from_mode(ROOT_MODE))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
        changes.push(format!(
            "created {} (root:root {ROOT_MODE:04o})",
            dir.display()
        ));
    }
    Ok(())
}

/// Creates the agents' account if missing and gives it the password field
/// `*`: no password matches it, and unlike a locked `!` it does not make
/// sshd without PAM refuse the key.
fn ensure_agent_account(name: &str, changes: &mut Changes) -> Result<Account> {
    if Account::lookup(name)?.is_none() {
        let mut useradd = Command::new("useradd");
        useradd.arg("--system");
        if Group::from_name(name)
            .with_context(|| format!("looking up the group {name}"))?
            .is_some()
        {
            useradd.args(["--gid", name]);
        } else {
            useradd.arg("--user-group");
        }
        useradd.args([
            "--no-create-home",
            "--home-dir",
            "/",
            "--shell",
            NOLOGIN,
            name,
        ]);
        match command::run(&mut useradd, "install passwd") {
            Ok(_) => changes.push(format!(
                "created the account {name} (system account, home /, shell {NOLOGIN})"
            )),
            // Another init made it meanwhile.
            Err(_) if Account::lookup(name)?.is_some() => {}
            Err(e) => return Err(e),
        }
    }
    let account = Account::lookup(name)?
        .with_context(|| format!("the account {name} is missing after useradd"))?;
    let field = password_field(name)?;
    if field != "*" {
        let set = command::run(
            Command::new("usermod").args(["-p", "*", name]),
            "install passwd",
        );
        if let Err(e) = set {
            if password_field(name)? != "*" {
                return Err(e);
            }
        }
        changes.push(format!(
            "{name}: password field {} → * (no password matches it, and sshd \
             without PAM refuses a locked account)",
            describe_password_field(&field)
        ));
    }
    Ok(account)
}

/// The password field of `name`'s shadow entry.
fn password_field(name: &str) -> Result<String> {
    let line = command::run(
        Command::new("getent").args(["shadow", name]),
        "install libc-bin",
    )?;
    parse_password_field(&line)
        .map(str::to_string)
        .with_context(|| format!("getent shadow {name}: no password field in its output"))
}

fn parse_password_field(shadow_line: &str) -> Option<&str> {
    shadow_line.lines().next()?.split(':').nth(1)
}

/// Says what kind of password field it is, never its content.
fn describe_password_field(field: &str) -> &'static str {
    match field {
        "" => "empty",
        "*" => "*",
        f if f.starts_with('!') => "locked (!)",
        _ => "a password hash",
    }
}

/// Owner, group and mode of a spool entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The owner, group and mode a [`LAYOUT`] directory should have.
pub fn want_for(access: Access, master: &Account, agents: &Account) -> Want {
    let gid = match access {
        Access::AgentsCreate => agents.gid,
        Access::MasterWrites | Access::AgentsRead | Access::MasterOnly => master.gid,
    };
    Want {
        uid: master.uid,
        gid,
        mode: access.mode(),
    }
}

/// Makes the spool root and every [`LAYOUT`] directory, or puts their
/// owners, groups and modes back.
pub fn apply_layout(
    spool: &Path,
    master: &Account,
    agents: &Account,
    changes: &mut Changes,
) -> Result<()> {
    let root = Want {
        uid: master.uid,
        gid: master.gid,
        mode: ROOT_MODE,
    };
    ensure_dir(spool, &spool.display().to_string(), root, changes)?;
    for (dir, access) in LAYOUT {
        let want = want_for(access, master, agents);
        ensure_dir(&spool.join(dir), &format!("{dir}/"), want, changes)?;
    }
    Ok(())
}

fn ensure_dir(path: &Path, shown: &str, want: Want, changes: &mut Changes) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            DirBuilder::new()
                .mode(want.mode & 0o777)
                .create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            ensure_owner_and_mode(path, shown, want, &mut Changes::default())?;
            changes.push(format!(
                "created {shown} ({} {:04o})",
                owner_name(want.uid, want.gid),
                want.mode
            ));
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symlink; a spool directory must be a directory of its own \
             (remove the link and run init again)",
            path.display()
        ),
        Ok(m) if !m.is_dir() => bail!(
            "{} is not a directory; move it away and run init again",
            path.display()
        ),
        Ok(_) => {}
    }
    ensure_owner_and_mode(path, shown, want, changes)
}

/// Puts `want`'s owner, group and mode on `path`, which is not a symlink.
fn ensure_owner_and_mode(
    path: &Path,
    shown: &str,
    want: Want,
    changes: &mut Changes,
) -> Result<()> {
    let m = fs::symlink_metadata(path).with_context(|| format!("checking {}", path.display()))?;
    if (m.uid(), m.gid()) != (want.uid, want.gid) {
        lchown(path, Some(want.uid), Some(want.gid))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
        changes.push(format!(
            "{shown}: owner {} → {}",
            owner_name(m.uid(), m.gid()),
            owner_name(want.uid, want.gid)
        ));
    }
    // chown may have dropped set-id bits: read the mode again.
    let mode = fs::symlink_metadata(path)
        .with_context(|| format!("checking {}", path.display()))?
        .mode()
        & 0o7777;
    if mode != want.mode {
        fs::set_permissions(path, fs::Permissions::from_mode(want.mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        changes.push(format!("{shown}: mode {mode:04o} → {:04o}", want.mode));
    }
    Ok(())
}

/// `jobs.toml` and everything under the master's directories belong to the
/// master and are writable by nobody else; agents' directories keep what
/// agents made.
fn repair_master_files(spool: &Path, master: &Account, changes: &mut Changes) -> Result<()> {
    let list = spool.join(JOB_LIST);
    let m = fs::symlink_metadata(&list).with_context(|| format!("checking {}", list.display()))?;
    if !m.is_file() {
        bail!(
            "{} is not a regular file; move it away and run init again",
            list.display()
        );
    }
    let want = Want {
        uid: master.uid,
        gid: master.gid,
        mode: JOB_LIST_MODE,
    };
    ensure_owner_and_mode(&list, JOB_LIST, want, changes)?;
    for (dir, access) in LAYOUT {
        if access != Access::AgentsCreate {
            repair_tree(spool, Path::new(dir), master, changes)?;
        }
    }
    Ok(())
}

/// Gives every entry under `rel` the master's ownership and takes away
/// group and other write (and set-id) bits. Symlinks are reported, never followed.
fn repair_tree(spool: &Path, rel: &Path, master: &Account, changes: &mut Changes) -> Result<()> {
    let dir = spool.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let path = spool.join(&rel);
        let shown = rel.display().to_string();
        let m =
            fs::symlink_metadata(&path).with_context(|| format!("checking {}", path.display()))?;
        let ft = m.file_type();
        if ft.is_symlink() {
            changes.push(format!(
                "left {shown} alone: a symlink, which the master never follows; remove it"
            ));
            continue;
        }
        if !ft.is_dir() && !ft.is_file() {
            changes.push(format!(
                "left {shown} alone: neither a file nor a directory; remove it"
            ));
            continue;
        }
        let want = Want {
            uid: master.uid,
            gid: master.gid,
            mode: m.mode() & 0o755,
        };
        ensure_owner_and_mode(&path, &shown, want, changes)?;
        if ft.is_dir() {
            repair_tree(spool, &rel, master, changes)?;
        }
    }
    Ok(())
}

/// What else agents see in their chroot: everything in the spool's parent
/// that others may read.
fn chroot_neighbours(layout: &ChrootLayout) -> Result<Vec<String>> {
    let spool_name = layout.spool.file_name();
    let mut others: Vec<String> = fs::read_dir(&layout.chroot)
        .with_context(|| format!("listing {}", layout.chroot.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| Some(e.file_name().as_os_str()) != spool_name)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(TMP_PREFIX))
        .collect();
    others.sort();
    if others.is_empty() {
        return Ok(vec![]);
    }
    Ok(vec![format!(
        "agents are chrooted into {} and can read whatever of {} others may read; \
         a spool's parent is best a directory of its own",
        layout.chroot.display(),
        others.join(", ")
    )])
}

fn user_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

fn group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

fn owner_name(uid: u32, gid: u32) -> String {
    format!("{}:{}", user_name(uid), group_name(gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Account {
        Account {
            name: "me".into(),
            uid: Uid::effective().as_raw(),
            gid: Gid::effective().as_raw(),
        }
    }

    /// As root, a group of their own for the agents; otherwise the
    /// caller's own, which is all an unprivileged chown may give.
    fn agents() -> Account {
        let gid = if Uid::effective().is_root() {
            64_999
        } else {
            Gid::effective().as_raw()
        };
        Account {
            name: "agents".into(),
            uid: 64_998,
            gid,
        }
    }

    fn stat(p: &Path) -> (u32, u32, u32) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    }

    #[test]
    fn the_layout_gives_each_directory_its_owner_group_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let (master, agents) = (me(), agents());
        let mut changes = Changes::default();
        apply_layout(&spool, &master, &agents, &mut changes).unwrap();
        assert_eq!(stat(&spool), (master.uid, master.gid, 0o755));
        for (d, access) in LAYOUT {
            let want = want_for(access, &master, &agents);
            assert_eq!(stat(&spool.join(d)), (want.uid, want.gid, want.mode), "{d}");
        }
        assert_eq!(stat(&spool.join("leases")).2, 0o1775);
        assert_eq!(stat(&spool.join("images")).2, 0o711);
        assert_eq!(stat(&spool.join("jobs")).2, 0o755);
        assert_eq!(changes.0.len(), LAYOUT.len() + 1, "{:?}", changes.0);
        assert!(changes.0[1].starts_with("created "), "{:?}", changes.0);

        // A second run finds nothing to do.
        let mut again = Changes::default();
        apply_layout(&spool, &master, &agents, &mut again).unwrap();
        assert!(again.0.is_empty(), "{:?}", again.0);
    }

    #[test]
    fn init_puts_back_modes_that_drifted_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let (master, agents) = (me(), agents());
        apply_layout(&spool, &master, &agents, &mut Changes::default()).unwrap();
        fs::set_permissions(spool.join("leases"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(spool.join("history"), fs::Permissions::from_mode(0o755)).unwrap();
        let mut changes = Changes::default();
        apply_layout(&spool, &master, &agents, &mut changes).unwrap();
        assert_eq!(
            changes.0,
            ["leases/: mode 0777 → 1775", "history/: mode 0755 → 0700"]
        );
    }

    #[test]
    fn master_files_lose_write_bits_for_others_and_symlinks_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let master = me();
        apply_layout(&spool, &master, &agents(), &mut Changes::default()).unwrap();
        fs::write(spool.join(JOB_LIST), "").unwrap();
        fs::set_permissions(spool.join(JOB_LIST), fs::Permissions::from_mode(0o666)).unwrap();
        fs::create_dir_all(spool.join("payloads/os")).unwrap();
        fs::write(spool.join("payloads/os/base.tar"), "x").unwrap();
        fs::set_permissions(
            spool.join("payloads/os/base.tar"),
            fs::Permissions::from_mode(0o4777),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", spool.join("jobs/evil.toml")).unwrap();
        let mut changes = Changes::default();
        repair_master_files(&spool, &master, &mut changes).unwrap();
        assert_eq!(stat(&spool.join(JOB_LIST)).2, 0o644);
        assert_eq!(stat(&spool.join("payloads/os/base.tar")).2, 0o755);
        assert!(
            changes
                .0
                .iter()
                .any(|c| c.starts_with("left jobs/evil.toml alone")),
            "{:?}",
            changes.0
        );
        assert!(
            changes
                .0
                .contains(&"payloads/os/base.tar: mode 4777 → 0755".to_string()),
            "{:?}",
            changes.0
        );
        // The link's target was not touched.
        assert_eq!(stat(Path::new("/etc/passwd")).2, 0o644);
    }

    #[test]
    fn a_symlinked_spool_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        fs::create_dir(&spool).unwrap();
        std::os::unix::fs::symlink("/etc", spool.join("leases")).unwrap();
        let e = apply_layout(&spool, &me(), &agents(), &mut Changes::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("leases is a symlink"), "{e}");
    }

    #[test]
    fn account_names() {
        for ok in ["kiln-agent", "_kiln", "agents2"] {
            check_account_name(ok).unwrap();
        }
        for bad in [
            "",
            "Kiln",
            "kiln agent",
            "kiln,root",
            "*",
            "!root",
            "-x",
            &"a".repeat(33),
        ] {
            assert!(check_account_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_fields_are_described_never_shown() {
        assert_eq!(
            parse_password_field("kiln-agent:!:19000:0:99999:7:::\n"),
            Some("!")
        );
        assert_eq!(describe_password_field("!"), "locked (!)");
        assert_eq!(describe_password_field("!$6$salt$hash"), "locked (!)");
        assert_eq!(describe_password_field("$6$salt$hash"), "a password hash");
        assert_eq!(describe_password_field(""), "empty");
    }
}
