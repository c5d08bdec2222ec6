//! `[image] generalize`: removes what ties the image to the machine that
//! built it, as virt-sysprep does, so that every machine deployed from it
//! becomes itself: SSH host keys (made again at first boot by a unit kiln
//! adds), the machine-id (left empty: systemd makes one at first boot), the
//! random seed, DHCP leases, logs, temporary files and package caches. It
//! returns what it removed, for the manifest.
//!
//! Every path is resolved beneath the target (see [`crate::tree`]); nothing
//! is followed out of it.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

use kiln_spool::manifest::{MAX_GENERALIZED, MAX_GENERALIZED_LINE};

use crate::error::{Error, Result};
use crate::joblog::JobLog;
use crate::tree::{Tree, TreeError};

/// The unit that makes missing SSH host keys before sshd starts. Debian's
/// openssh-server makes them only in its postinst.
pub const SSH_KEYGEN_UNIT: &str = "kiln-ssh-host-keys.service";
const SSH_KEYGEN_UNIT_TEXT: &str = "\
[Unit]
Description=Make the SSH host keys this machine lacks
Before=ssh.service ssh.socket sshd.service
ConditionPathExists=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target ssh.service sshd.service
";

/// Files removed when present, and what they are.
const FILES: [&str; 4] = [
    "var/lib/systemd/random-seed",
    "var/lib/urandom/random-seed",
    "var/lib/systemd/credential.secret",
    "root/.bash_history",
];

/// Directories emptied (what is in them, recursively; they stay) and
/// which entries: `None` for all.
const DIRS: [(&str, Option<&str>); 10] = [
    ("var/lib/dhcp", Some(".leases")),
    ("var/lib/dhclient", Some(".leases")),
    ("var/lib/NetworkManager", Some(".lease")),
    ("var/log", None),
    ("var/cache/apt/archives", Some(".deb")),
    ("var/cache/apt", Some(".bin")),
    ("var/cache/debconf", Some("-old")),
    ("tmp", None),
    ("var/tmp", None),
    ("etc/ssh", Some("_key.pub")),
];

/// `removed` as the manifest holds it: control characters (a file name
/// may hold any) shown as `?`, each line and their number bounded.
pub fn manifest_lines(removed: Vec<String>) -> Vec<String> {
    let total = removed.len();
    let mut out: Vec<String> = removed
        .into_iter()
        .take(if total > MAX_GENERALIZED {
            MAX_GENERALIZED - 1
        } else {
            total
        })
        .map(|l| {
            let mut l: String = l
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            if l.len() > MAX_GENERALIZED_LINE {
                let mut end = MAX_GENERALIZED_LINE - 3;
                while !l.is_char_boundary(end) {
                    end -= 1;
                }
                l.truncate(end);
                l.push_str("...");
            }
            l
        })
        .collect();
    if total > out.len() {
        out.push(format!("... and {} more", total - out.len()));
    }
    out
}

/// Generalizes the target; returns one line per thing removed.
pub fn generalize(tree: &Tree, log: &JobLog) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let fail = |what: &str, e: TreeError| Error::Failed(format!("generalize: {what}: {e}"));

    // SSH host keys: the private keys, then their .pub halves.
    let had_keys = remove_matching(tree, "etc/ssh", |n| {
        n.starts_with("ssh_host_") && n.ends_with("_key")
    })
    .map_err(|e| fail("/etc/ssh", e))?;
    for k in &had_keys {
        removed.push(format!("/etc/ssh/{k}"));
    }
    for (dir, suffix) in DIRS {
        let names = remove_matching(tree, dir, |n| match suffix {
            Some("_key.pub") => n.starts_with("ssh_host_") && n.ends_with("_key.pub"),
            Some(s) => n.ends_with(s),
            None => true,
        })
        .map_err(|e| fail(dir, e))?;
        match names.len() {
            0 => {}
            1..=4 => removed.extend(names.iter().map(|n| format!("/{dir}/{n}"))),
            n => removed.push(format!("/{dir}/: {n} entries")),
        }
    }
    for f in FILES {
        if remove_file(tree, f).map_err(|e| fail(f, e))? {
            removed.push(format!("/{f}"));
        }
    }
    // An empty machine-id (not a missing one) marks the first boot for
    // systemd, which then makes and keeps a new one.
    if exists(tree, "etc/machine-id") {
        tree.write_file(Path::new("etc/machine-id"), b"", 0o444, 0, 0)
            .map_err(|e| fail("/etc/machine-id", e))?;
        removed.push("/etc/machine-id (emptied)".into());
    }
    if is_regular(tree, "var/lib/dbus/machine-id")
        && remove_file(tree, "var/lib/dbus/machine-id")
            .map_err(|e| fail("/var/lib/dbus/machine-id", e))?
    {
        removed.push("/var/lib/dbus/machine-id".into());
    }
    if exists(tree, "usr/sbin/sshd") {
        if exists(tree, "etc/systemd/system") || exists(tree, "lib/systemd/systemd") {
            install_keygen_unit(tree).map_err(|e| fail("the SSH host key unit", e))?;
            log.line(&format!(
                "generalize: /etc/systemd/system/{SSH_KEYGEN_UNIT} makes SSH host keys at first boot"
            ));
        } else {
            log.line("generalize: the target has sshd but no systemd: nothing makes its host keys at first boot");
        }
    }
    for r in &removed {
        log.line(&format!("generalize: removed {r}"));
    }
    Ok(removed)
}

fn install_keygen_unit(tree: &Tree) -> std::result::Result<(), TreeError> {
    let unit = format!("etc/systemd/system/{SSH_KEYGEN_UNIT}");
    tree.write_file(
        Path::new(&unit),
        SSH_KEYGEN_UNIT_TEXT.as_bytes(),
        0o644,
        0,
        0,
    )?;
    for wants in ["multi-user.target.wants", "ssh.service.wants"] {
        tree.symlink(
            &Path::new("etc/systemd/system")
                .join(wants)
                .join(SSH_KEYGEN_UNIT),
            &Path::new("/").join(&unit),
        )?;
    }
    Ok(())
}

fn exists(tree: &Tree, rel: &str) -> bool {
    tree.slot(Path::new(rel))
        .is_ok_and(|s| s.kind().is_ok_and(|k| k.is_some()))
}

fn is_regular(tree: &Tree, rel: &str) -> bool {
    tree.slot(Path::new(rel))
        .is_ok_and(|s| s.kind().is_ok_and(|k| k == Some(libc::S_IFREG)))
}

/// Removes a file or symlink; false when there was none.
fn remove_file(tree: &Tree, rel: &str) -> std::result::Result<bool, TreeError> {
    let rel = Path::new(rel);
    let Some(parent) = rel.parent() else {
        return Ok(false);
    };
    if !dir_exists(tree, parent) {
        return Ok(false);
    }
    let slot = tree.slot(rel)?;
    let kind = slot
        .kind()
        .map_err(|source| io("inspecting", rel, source))?;
    if kind.is_none() || kind == Some(libc::S_IFDIR) {
        return Ok(false);
    }
    slot.remove_non_dir()
        .map_err(|source| io("removing", rel, source))?;
    Ok(true)
}

fn dir_exists(tree: &Tree, rel: &Path) -> bool {
    rel.as_os_str().is_empty()
        || tree
            .open_file(rel)
            .is_ok_and(|f| f.metadata().is_ok_and(|m| m.is_dir()))
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> TreeError {
    TreeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes the entries of directory `dir` whose names `keep_out` picks,
/// with everything beneath them; returns their names. A missing directory
/// removes nothing.
fn remove_matching(
    tree: &Tree,
    dir: &str,
    pick: impl Fn(&str) -> bool,
) -> std::result::Result<Vec<String>, TreeError> {
    let rel = Path::new(dir);
    if !dir_exists(tree, rel) {
        return Ok(Vec::new());
    }
    let fd = tree.dir(rel)?;
    let mut names = Vec::new();
    for name in list(&fd).map_err(|e| io("listing", rel, e))? {
        let Ok(shown) = name.to_str() else { continue };
        if !pick(shown) {
            continue;
        }
        remove_entry(&fd, &name).map_err(|e| io("removing", &rel.join(shown), e))?;
        names.push(shown.to_string());
    }
    names.sort();
    Ok(names)
}

fn list(dir: &OwnedFd) -> std::io::Result<Vec<CString>> {
    let fd = nix::unistd::dup(dir.as_raw_fd())?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name();
        if n.to_bytes() == b"." || n.to_bytes() == b".." {
            continue;
        }
        out.push(n.to_owned());
    }
    Ok(out)
}

/// Removes `name` in `dir`: a file or symlink, or a directory with all it
/// holds (never following a symlink).
fn remove_entry(dir: &OwnedFd, name: &CStr) -> std::io::Result<()> {
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EISDIR) | Err(nix::errno::Errno::EPERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    let sub = unsafe { OwnedFd::from_raw_fd(sub) };
    for n in list(&sub)? {
        remove_entry(&sub, &n)?;
    }
    unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joblog(dir: &Path) -> JobLog {
        JobLog::create(&dir.join("log")).unwrap()
    }

    #[test]
    fn the_manifest_gets_bounded_printable_lines() {
        let lines = manifest_lines(vec!["/tmp/a\nb".into(), "x".repeat(2000)]);
        assert_eq!(lines[0], "/tmp/a?b");
        assert_eq!(lines[1].len(), MAX_GENERALIZED_LINE);
        assert!(lines[1].ends_with("..."));
        let many = manifest_lines((0..1000).map(|i| i.to_string()).collect());
        assert_eq!(many.len(), MAX_GENERALIZED);
        assert_eq!(
            many[MAX_GENERALIZED - 1],
            format!("... and {} more", 1000 - (MAX_GENERALIZED - 1))
        );
        assert!(kiln_spool::untrusted::check_generalized(&many).is_ok());
    }

    #[test]
    fn a_built_system_loses_its_identity_and_keeps_its_directories() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        for d in [
            "etc/ssh",
            "etc/systemd/system",
            "usr/sbin",
            "var/lib/systemd",
            "var/lib/dhcp",
            "var/log/apt",
            "var/log/journal/0123",
            "var/cache/apt/archives/partial",
            "tmp/x",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "etc/ssh/sshd_config",
            "usr/sbin/sshd",
            "var/lib/systemd/random-seed",
            "var/lib/dhcp/dhclient.eth0.leases",
            "var/log/apt/history.log",
            "var/log/journal/0123/system.journal",
            "var/log/dpkg.log",
            "var/cache/apt/archives/a.deb",
            "var/cache/apt/pkgcache.bin",
            "tmp/x/y",
        ] {
            std::fs::write(root.join(f), "x").unwrap();
        }
        std::fs::write(root.join("etc/machine-id"), "0123\n").unwrap();
        // A symlink out of the target is removed, never followed.
        let outside = t.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("var/log/escape")).unwrap();

        let tree = Tree::open(&root).unwrap();
        let removed = generalize(&tree, &joblog(t.path())).unwrap();
        assert!(
            removed.contains(&"/etc/ssh/ssh_host_ed25519_key".to_string()),
            "{removed:?}"
        );
        assert!(removed.contains(&"/etc/machine-id (emptied)".to_string()));
        assert!(removed.contains(&"/var/lib/systemd/random-seed".to_string()));
        assert!(removed.contains(&"/var/lib/dhcp/dhclient.eth0.leases".to_string()));
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(!root.join("etc/ssh/ssh_host_ed25519_key.pub").exists());
        assert!(root.join("etc/ssh/sshd_config").exists());
        assert_eq!(std::fs::read(root.join("etc/machine-id")).unwrap(), b"");
        assert!(root.join("var/log").is_dir());
        assert_eq!(std::fs::read_dir(root.join("var/log")).unwrap().count(), 0);
        assert!(!root.join("var/cache/apt/archives/a.deb").exists());
        assert!(root.join("var/cache/apt/archives/partial").is_dir());
        assert!(!root.join("var/cache/apt/pkgcache.bin").exists());
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let unit = root.join("etc/systemd/system").join(SSH_KEYGEN_UNIT);
        assert!(std::fs::read_to_string(&unit)
            .unwrap()
            .contains("ssh-keygen -A"));
        assert_eq!(
            std::fs::read_link(
                root.join("etc/systemd/system/ssh.service.wants")
                    .join(SSH_KEYGEN_UNIT)
            )
            .unwrap(),
            Path::new("/etc/systemd/system").join(SSH_KEYGEN_UNIT)
        );
        // A second pass finds nothing more to remove.
        let again = generalize(&tree, &joblog(t.path())).unwrap();
        assert_eq!(again, ["/etc/machine-id (emptied)"]);
    }
}
