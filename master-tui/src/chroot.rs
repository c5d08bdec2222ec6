//! Where agents find the spool. sshd wants a `ChrootDirectory` that is
//! owned by root and writable by nobody else, and so is every directory
//! above it; the spool belongs to the master's account. So agents are
//! chrooted into the spool's *parent* and see the spool as `/<its name>`:
//! spool `/srv/kiln/spool` means `ChrootDirectory /srv/kiln` and
//! `spool = "/spool"` in `agent.toml`.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where a spool recommended by the README lives: in a parent of its own.
pub const EXAMPLE_SPOOL: &str = "/srv/kiln/spool";

/// A spool's place under sshd's chroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChrootLayout {
    /// The spool, absolute.
    pub spool: PathBuf,
    /// sshd's `ChrootDirectory`: the spool's parent.
    pub chroot: PathBuf,
    /// The spool as agents name it inside the chroot (`agent.toml`'s `spool`).
    pub spool_in_chroot: String,
}

impl ChrootLayout {
    /// The layout for an absolute spool path, without looking at the disk.
    pub fn new(spool: &Path) -> Result<Self, String> {
        if !spool.is_absolute() {
            return Err(format!("{} is not an absolute path", spool.display()));
        }
        if spool
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        {
            return Err(format!(
                "{} has . or .. in it; name the spool by its plain path",
                spool.display()
            ));
        }
        let text = spool
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", spool.display()))?;
        check_config_word(text).map_err(|p| format!("{text}: {p}"))?;
        let (Some(chroot), Some(name)) = (spool.parent(), spool.file_name()) else {
            return Err(format!("{text} is the root directory, not a spool"));
        };
        if chroot == Path::new("/") {
            return Err(format!(
                "the spool {text} sits directly in /, so agents would be chrooted \
                 into / and see the whole filesystem; give it a parent of its own, \
                 e.g. {EXAMPLE_SPOOL}"
            ));
        }
        Ok(ChrootLayout {
            spool: spool.to_path_buf(),
            chroot: chroot.to_path_buf(),
            spool_in_chroot: format!("/{}", name.to_string_lossy()),
        })
    }

    /// The layout for `spool` as given on the command line: made absolute,
    /// its parent's symlinks resolved when the parent exists.
    pub fn resolve(spool: &Path) -> Result<Self> {
        let abs = std::path::absolute(spool)
            .with_context(|| format!("making {} absolute", spool.display()))?;
        let abs = match (abs.parent(), abs.file_name()) {
            (Some(parent), Some(name)) if parent.is_dir() => parent
                .canonicalize()
                .with_context(|| format!("resolving {}", parent.display()))?
                .join(name),
            _ => abs,
        };
        ChrootLayout::new(&abs).map_err(anyhow::Error::msg)
    }
}

/// Checks that `text` can stand in sshd_config as one word with no token
/// expansion: no whitespace, quotes, `%`, `#`, backslashes or control characters.
pub fn check_config_word(text: &str) -> Result<(), String> {
    match text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'%#\\,".contains(*c))
    {
        Some(c) => Err(format!(
            "holds {c:?}, which sshd_config cannot carry in a path; pick a plain path"
        )),
        None => Ok(()),
    }
}

/// sshd's rule for each directory from `/` down to a `ChrootDirectory`:
/// owned by root, writable by nobody else.
pub fn check_chroot_component(uid: u32, mode: u32, is_dir: bool) -> Result<(), String> {
    if !is_dir {
        return Err("is not a directory".into());
    }
    if uid != 0 {
        return Err(format!("is owned by uid {uid}, not root"));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "has mode {:04o}: group or others can write it",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Checks `chroot` and every directory above it as sshd will when an agent
/// logs in. The error names the first component that fails and the fix.
pub fn check_chroot(chroot: &Path) -> Result<()> {
    check_chroot_down_to(chroot, chroot)
}

/// Checks `dir` and every directory above it, which will be or hold
/// `chroot`, by sshd's rule for a chroot.
pub fn check_chroot_down_to(dir: &Path, chroot: &Path) -> Result<()> {
    let mut parts: Vec<&Path> = dir.ancestors().collect();
    parts.reverse();
    for p in parts {
        // sshd stat()s each component, following symlinks; so does this.
        let meta = std::fs::metadata(p).with_context(|| format!("checking {}", p.display()))?;
        if let Err(problem) = check_chroot_component(meta.uid(), meta.mode(), meta.is_dir()) {
            let fix = if meta.mode() & 0o1000 != 0 {
                // Sticky: a shared directory like /tmp, which must stay as it is.
                format!("{} is shared: put the spool", p.display())
            } else {
                format!(
                    "fix {p} (chown root:root {p}; chmod go-w {p}) if nothing else \
                     relies on it, or put the spool",
                    p = p.display()
                )
            };
            bail!(
                "{} {problem}. sshd chroots agents into {} and needs it and every \
                 directory above it owned by root and writable by nobody else: \
                 {fix} in a directory of its own, e.g. {EXAMPLE_SPOOL}",
                p.display(),
                chroot.display(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_chrooted_into_the_spools_parent() {
        let l = ChrootLayout::new(Path::new("/srv/kiln/spool")).unwrap();
        assert_eq!(l.chroot, Path::new("/srv/kiln"));
        assert_eq!(l.spool_in_chroot, "/spool");
        let l = ChrootLayout::new(Path::new("/var/lib/kiln/jobs")).unwrap();
        assert_eq!(l.chroot, Path::new("/var/lib/kiln"));
        assert_eq!(l.spool_in_chroot, "/jobs");
    }

    #[test]
    fn a_spool_in_slash_or_with_dots_or_odd_characters_is_refused() {
        for (path, says) in [
            ("/spool", "directly in /"),
            ("/", "root directory"),
            ("spool", "absolute"),
            ("/srv/../spool", ". or .."),
            ("/srv/kiln dir/spool", "sshd_config"),
            ("/srv/%u/spool", "sshd_config"),
            ("/srv/kiln#1/spool", "sshd_config"),
            ("/srv/kiln\n/spool", "sshd_config"),
        ] {
            let e = ChrootLayout::new(Path::new(path)).unwrap_err();
            assert!(e.contains(says), "{path:?}: {e}");
        }
    }

    #[test]
    fn resolve_makes_the_spool_absolute() {
        let l = ChrootLayout::resolve(Path::new("spool")).unwrap();
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(l.spool, cwd.join("spool"));
        assert_eq!(l.chroot, cwd);
    }

    #[test]
    fn a_chroot_component_must_be_roots_and_unwritable_by_others() {
        check_chroot_component(0, 0o40755, true).unwrap();
        check_chroot_component(0, 0o40711, true).unwrap();
        for (uid, mode, dir, says) in [
            (1000, 0o40755, true, "uid 1000"),
            (0, 0o41777, true, "1777"),
            (0, 0o40775, true, "0775"),
            (0, 0o100644, false, "not a directory"),
        ] {
            let e = check_chroot_component(uid, mode, dir).unwrap_err();
            assert!(e.contains(says), "{uid} {mode:o}: {e}");
        }
    }

    #[test]
    fn a_chroot_under_tmp_is_refused_naming_tmp() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let meta = std::fs::metadata(&tmp).unwrap();
        if meta.mode() & 0o022 == 0 {
            return; // a private temporary directory passes sshd's rule
        }
        let dir = tempfile::tempdir().unwrap();
        let e = check_chroot(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{} has mode", tmp.display())), "{e}");
        assert!(e.contains(EXAMPLE_SPOOL), "{e}");
    }
}
