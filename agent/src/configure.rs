//! Configuration written straight into the target's files, with no tool
//! from the target: hostname and hosts, timezone, users and groups (passwd,
//! group, shadow, gshadow), homes and authorized_keys, files, fstab.

use std::path::Path;

use kiln_spool::job::{Configure, FsKind, User};

use crate::disk::mkfs::FsId;
use crate::disk::plan::PlannedPartition;
use crate::error::{Error, Result};
use crate::tree::{Tree, TreeError};

/// A filesystem as fstab sees it.
pub struct FsEntry<'a> {
    pub part: &'a PlannedPartition,
    pub id: &'a FsId,
}

fn fail(what: &str) -> impl FnOnce(TreeError) -> Error + '_ {
    move |e| Error::Failed(format!("configure {what}: {e}"))
}

/// Applies `[configure]` to the mounted target. `now_days` is today in days
/// since the epoch, for shadow's last-change field.
pub fn configure(
    tree: &Tree,
    c: &Configure,
    filesystems: &[FsEntry],
    job_id: &str,
    now_days: u64,
) -> Result<()> {
    if let Some(h) = &c.hostname {
        set_hostname(tree, h)?;
    }
    if let Some(tz) = &c.timezone {
        tree.symlink(
            Path::new("etc/localtime"),
            &Path::new("/usr/share/zoneinfo").join(tz),
        )
        .map_err(fail("timezone"))?;
        tree.write_file(
            Path::new("etc/timezone"),
            format!("{tz}\n").as_bytes(),
            0o644,
            0,
            0,
        )
        .map_err(fail("timezone"))?;
    }
    if !c.users.is_empty() {
        add_users(tree, &c.users, now_days)?;
    }
    if c.fstab {
        let text = fstab(filesystems, job_id);
        tree.write_file(Path::new("etc/fstab"), text.as_bytes(), 0o644, 0, 0)
            .map_err(fail("fstab"))?;
    }
    if !c.files.is_empty() {
        let accounts = Accounts::load(tree)?;
        for f in &c.files {
            let (u, g) = f.owner.split_once(':').unwrap_or((&f.owner, &f.owner));
            let uid = accounts.uid(u).ok_or_else(|| {
                Error::Failed(format!(
                    "configure file {}: no user {u:?} in the target",
                    f.path
                ))
            })?;
            let gid = accounts.gid(g).ok_or_else(|| {
                Error::Failed(format!(
                    "configure file {}: no group {g:?} in the target",
                    f.path
                ))
            })?;
            tree.write_file(
                Path::new(f.path.trim_start_matches('/')),
                f.content.as_bytes(),
                f.mode.0,
                uid,
                gid,
            )
            .map_err(|e| Error::Failed(format!("configure file {}: {e}", f.path)))?;
        }
    }
    Ok(())
}

fn set_hostname(tree: &Tree, host: &str) -> Result<()> {
    tree.write_file(
        Path::new("etc/hostname"),
        format!("{host}\n").as_bytes(),
        0o644,
        0,
        0,
    )
    .map_err(fail("hostname"))?;
    let short = host.split('.').next().unwrap_or(host);
    let names = if short == host {
        host.to_string()
    } else {
        format!("{host} {short}")
    };
    let old = tree
        .read_optional(Path::new("etc/hosts"))
        .map_err(fail("hosts"))?
        .unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| !l.trim_start().starts_with("127.0.1.1"))
        .map(str::to_string)
        .collect();
    if !lines
        .iter()
        .any(|l| l.split_whitespace().any(|w| w == "localhost"))
    {
        lines.insert(0, "127.0.0.1\tlocalhost".into());
        lines.push("::1\tlocalhost ip6-localhost ip6-loopback".into());
    }
    let at = lines
        .iter()
        .position(|l| l.starts_with("127.0.0.1"))
        .map_or(0, |i| i + 1);
    lines.insert(at, format!("127.0.1.1\t{names}"));
    let mut text = lines.join("\n");
    text.push('\n');
    tree.write_file(Path::new("etc/hosts"), text.as_bytes(), 0o644, 0, 0)
        .map_err(fail("hosts"))
}

/// The fstab for the job's filesystems, by UUID, in mount order.
pub fn fstab(filesystems: &[FsEntry], job_id: &str) -> String {
    let mut out = format!("# /etc/fstab of kiln job {job_id}\n");
    let mut mounted: Vec<&FsEntry> = filesystems
        .iter()
        .filter(|f| f.part.mount.is_some())
        .collect();
    mounted.sort_by_key(|f| mount_depth(f.part.mount.as_deref().unwrap_or("/")));
    for f in mounted {
        let m = f.part.mount.as_deref().unwrap_or("/");
        let (fstype, opts, pass) = match f.part.fs {
            FsKind::Vfat => ("vfat", "umask=0077", 2),
            _ if m == "/" => ("ext4", "errors=remount-ro", 1),
            _ => ("ext4", "defaults", 2),
        };
        out.push_str(&format!(
            "UUID={} {m} {fstype} {opts} 0 {pass}\n",
            f.id.uuid
        ));
    }
    for f in filesystems.iter().filter(|f| f.part.fs == FsKind::Swap) {
        out.push_str(&format!("UUID={} none swap sw 0 0\n", f.id.uuid));
    }
    out
}

/// Number of components of a mount point: `/` is 0, `/boot/efi` is 2.
pub fn mount_depth(m: &str) -> usize {
    m.split('/').filter(|c| !c.is_empty()).count()
}

/// The target's account databases, as lines split on ':'.
struct Accounts {
    passwd: Vec<Vec<String>>,
    group: Vec<Vec<String>>,
    shadow: Vec<Vec<String>>,
    gshadow: Option<Vec<Vec<String>>>,
}

fn split(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

fn join(rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.join(":"));
        s.push('\n');
    }
    s
}

impl Accounts {
    fn load(tree: &Tree) -> Result<Accounts> {
        let read = |p: &str| {
            tree.read_optional(Path::new(p))
                .map_err(|e| Error::Failed(format!("configure users: {e}")))
        };
        let mut passwd = split(&read("etc/passwd")?.unwrap_or_default());
        let mut group = split(&read("etc/group")?.unwrap_or_default());
        let shadow = split(&read("etc/shadow")?.unwrap_or_default());
        let gshadow = read("etc/gshadow")?.map(|t| split(&t));
        if !passwd.iter().any(|r| r[0] == "root") {
            passwd.insert(
                0,
                ["root", "x", "0", "0", "root", "/root", "/bin/sh"]
                    .map(String::from)
                    .to_vec(),
            );
        }
        if !group.iter().any(|r| r[0] == "root") {
            group.insert(0, ["root", "x", "0", ""].map(String::from).to_vec());
        }
        Ok(Accounts {
            passwd,
            group,
            shadow,
            gshadow,
        })
    }

    fn save(&self, tree: &Tree) -> Result<()> {
        let w = |p: &str, text: String, mode: u32, gid: u32| {
            tree.write_file(Path::new(p), text.as_bytes(), mode, 0, gid)
                .map_err(|e| Error::Failed(format!("configure users: {e}")))
        };
        let shadow_gid = self.gid("shadow").unwrap_or(0);
        w("etc/passwd", join(&self.passwd), 0o644, 0)?;
        w("etc/group", join(&self.group), 0o644, 0)?;
        w("etc/shadow", join(&self.shadow), 0o640, shadow_gid)?;
        if let Some(gs) = &self.gshadow {
            w("etc/gshadow", join(gs), 0o640, shadow_gid)?;
        }
        Ok(())
    }

    fn uid(&self, name: &str) -> Option<u32> {
        name.parse().ok().or_else(|| {
            self.passwd
                .iter()
                .find(|r| r[0] == name)
                .and_then(|r| r.get(2)?.parse().ok())
        })
    }

    fn gid(&self, name: &str) -> Option<u32> {
        name.parse().ok().or_else(|| {
            self.group
                .iter()
                .find(|r| r[0] == name)
                .and_then(|r| r.get(2)?.parse().ok())
        })
    }

    fn free_id(rows: &[Vec<String>], from: u32) -> u32 {
        let used: std::collections::BTreeSet<u32> =
            rows.iter().filter_map(|r| r.get(2)?.parse().ok()).collect();
        (from..).find(|i| !used.contains(i)).unwrap_or(from)
    }

    /// Adds or replaces a group and returns its gid.
    fn ensure_group(&mut self, name: &str, gid: Option<u32>) -> u32 {
        if let Some(g) = self.gid(name) {
            if gid.is_none() || gid == Some(g) {
                return g;
            }
        }
        let gid = gid.unwrap_or_else(|| Self::free_id(&self.group, 1000));
        self.group.retain(|r| r[0] != name);
        self.group.push(vec![
            name.into(),
            "x".into(),
            gid.to_string(),
            String::new(),
        ]);
        if let Some(gs) = self.gshadow.as_mut() {
            gs.retain(|r| r[0] != name);
            gs.push(vec![name.into(), "!".into(), String::new(), String::new()]);
        }
        gid
    }

    fn add_member(&mut self, group: &str, user: &str) {
        for rows in [Some(&mut self.group), self.gshadow.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(r) = rows.iter_mut().find(|r| r[0] == group) {
                let col = 3;
                while r.len() <= col {
                    r.push(String::new());
                }
                let mut members: Vec<String> = r[col]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect();
                if !members.iter().any(|m| m == user) {
                    members.push(user.into());
                }
                r[col] = members.join(",");
            }
        }
    }
}

fn add_users(tree: &Tree, users: &[User], now_days: u64) -> Result<()> {
    let mut acc = Accounts::load(tree)?;
    let mut homes = Vec::new();
    for u in users {
        let uid = match (u.uid, acc.uid(&u.name)) {
            (Some(id), _) => id,
            (None, Some(existing)) => existing,
            (None, None) if u.name == "root" => 0,
            (None, None) => Accounts::free_id(&acc.passwd, 1000),
        };
        let want_gid = u.gid.or_else(|| {
            if u.name == "root" {
                return Some(0);
            }
            if acc.gid(&u.name).is_some() {
                return None;
            }
            let uid_text = uid.to_string();
            let taken = acc.group.iter().any(|r| r.get(2) == Some(&uid_text));
            (!taken).then_some(uid)
        });
        let gid = acc.ensure_group(&u.name, want_gid);
        let home = u.home_dir();
        acc.passwd.retain(|r| r[0] != u.name);
        acc.passwd.push(vec![
            u.name.clone(),
            "x".into(),
            uid.to_string(),
            gid.to_string(),
            u.name.clone(),
            home.clone(),
            u.shell.clone(),
        ]);
        acc.shadow.retain(|r| r[0] != u.name);
        acc.shadow.push(
            [
                u.name.as_str(),
                u.password_hash.as_deref().unwrap_or("!"),
                &now_days.to_string(),
                "0",
                "99999",
                "7",
                "",
                "",
                "",
            ]
            .map(String::from)
            .to_vec(),
        );
        for g in &u.groups {
            acc.ensure_group(g, None);
            acc.add_member(g, &u.name);
        }
        homes.push((u, uid, gid, home));
    }
    acc.save(tree)?;
    for (u, uid, gid, home) in homes {
        let rel = Path::new(home.trim_start_matches('/'));
        let err = |e: TreeError| Error::Failed(format!("configure user {}: {e}", u.name));
        tree.make_dir(rel, 0o750, uid, gid).map_err(err)?;
        if !u.authorized_keys.is_empty() {
            let ssh = rel.join(".ssh");
            tree.make_dir(&ssh, 0o700, uid, gid).map_err(err)?;
            let mut keys = u.authorized_keys.join("\n");
            keys.push('\n');
            tree.write_file(
                &ssh.join("authorized_keys"),
                keys.as_bytes(),
                0o600,
                uid,
                gid,
            )
            .map_err(err)?;
        }
    }
    Ok(())
}
