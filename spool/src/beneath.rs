//! File operations confined to a directory: every path is resolved relative
//! to the spool root's descriptor with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, and the last component is acted on with the `*at`
//! calls that do not follow it. Agents write parts of the spool, so a
//! symlink, a `..` or a mount point planted there must never lead the master
//! outside it, and a FIFO or device must never be read as a record.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::mkdirat;
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

/// How deep [`remove_tree`] goes before it gives up: agents can nest
/// directories, and each level holds a descriptor.
pub const MAX_TREE_DEPTH: usize = 64;

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

fn err(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Opens `rel` beneath `root` without following any symlink on the way.
/// `O_NONBLOCK` keeps a FIFO from stalling the open; callers check the type.
pub fn open(root: &OwnedFd, rel: &str, flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(resolve());
    let fd = openat2(root.as_raw_fd(), rel, how).map_err(|e| match e {
        // ELOOP: a symlink on the way; EXDEV: a way out of the spool.
        Errno::ELOOP | Errno::EXDEV => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{rel} leads through a symlink or out of the spool"),
        ),
        e => err(e),
    })?;
    // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the spool root itself: the operator named it, so it may be
/// reached through symlinks; nothing below it may.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory part and the last component of a relative path.
pub fn split(rel: &str) -> io::Result<(&str, &str)> {
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    if name.is_empty() || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{rel:?} does not name a file"),
        ));
    }
    Ok((dir, name))
}

/// Opens the directory `rel` (for `*at` calls on its entries).
pub fn open_dir(root: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    open(root, rel, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
}

/// Opens a regular file for reading; anything else (a directory, FIFO,
/// device or socket) is refused.
pub fn open_file(root: &OwnedFd, rel: &str) -> io::Result<File> {
    let fd = open(root, rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)?;
    let st = fstat(fd.as_raw_fd()).map_err(err)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{rel} is not a regular file"),
        ));
    }
    // Regular files ignore O_NONBLOCK, so the descriptor reads as usual.
    Ok(File::from(fd))
}

/// Creates `name` in `dir` exclusively, for writing.
pub fn create_new(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<File> {
    let fd = open(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        mode,
    )?;
    Ok(File::from(fd))
}

/// Creates or truncates `name` in `dir` for writing; never through a symlink.
pub fn create_truncate(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<File> {
    let fd = open(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
        mode,
    )?;
    let st = fstat(fd.as_raw_fd()).map_err(err)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is not a regular file"),
        ));
    }
    Ok(File::from(fd))
}

/// What is at `name` in `dir`, without following a symlink: `None` if nothing.
pub fn kind(dir: &OwnedFd, name: &str) -> io::Result<Option<(SFlag, u64)>> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT,
            st.st_size as u64,
        ))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// Entry names of a directory, with their types, `.` and `..` left out.
pub fn entries(root: &OwnedFd, rel: &str) -> io::Result<Vec<(String, Option<Type>)>> {
    let fd = open(root, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
    let mut dir = Dir::from_fd(fd.as_raw_fd()).map_err(err)?;
    // Dir now owns the descriptor and closes it.
    std::mem::forget(fd);
    let mut out = Vec::new();
    for e in dir.iter() {
        let e = e.map_err(err)?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        // Names that are not UTF-8 are kept lossily so that they are
        // reported and set aside rather than skipped unseen.
        out.push((String::from_utf8_lossy(name).into_owned(), e.file_type()));
    }
    Ok(out)
}

pub fn unlink(dir: &OwnedFd, name: &str) -> io::Result<()> {
    unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir).map_err(err)
}

/// Makes directory `name` with `mode` as given, whatever the umask.
pub fn mkdir(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<()> {
    mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(mode)).map_err(err)?;
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    // SAFETY: openat just returned this descriptor, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(err)
}

pub fn link(dir: &OwnedFd, from: &str, to_dir: &OwnedFd, to: &str) -> io::Result<()> {
    linkat(
        Some(dir.as_raw_fd()),
        from,
        Some(to_dir.as_raw_fd()),
        to,
        AtFlags::empty(),
    )
    .map_err(err)
}

/// renameat2(2) with RENAME_NOREPLACE, through the system call itself:
/// musl's libc has no wrapper for it.
fn renameat_noreplace(dir: &OwnedFd, from: &str, to_dir: &OwnedFd, to: &str) -> Result<(), Errno> {
    let cstr = |s: &str| std::ffi::CString::new(s).map_err(|_| Errno::EINVAL);
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both names are NUL-terminated and outlive the call; the
    // descriptors are open for its duration.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    Errno::result(r).map(drop)
}

/// Renames without replacing: `AlreadyExists` if `to` is there. Falls back
/// to link and unlink for files where the filesystem lacks RENAME_NOREPLACE.
pub fn rename_noreplace(dir: &OwnedFd, from: &str, to_dir: &OwnedFd, to: &str) -> io::Result<()> {
    match renameat_noreplace(dir, from, to_dir, to) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            link(dir, from, to_dir, to)?;
            unlink(dir, from)
        }
        Err(e) => Err(err(e)),
    }
}

/// Replaces `to` with `from` atomically.
pub fn rename_replace(dir: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    nix::fcntl::renameat(Some(dir.as_raw_fd()), from, Some(dir.as_raw_fd()), to).map_err(err)
}

/// Removes `name` in `dir` and everything below it, never following a
/// symlink: a link is removed as a link. Gone already is success.
pub fn remove_tree(dir: &OwnedFd, name: &str) -> io::Result<()> {
    remove_tree_at(dir, name, 0)
}

fn remove_tree_at(dir: &OwnedFd, name: &str, depth: usize) -> io::Result<()> {
    match kind(dir, name)? {
        None => Ok(()),
        Some((SFlag::S_IFDIR, _)) => {
            if depth >= MAX_TREE_DEPTH {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("directories nested deeper than {MAX_TREE_DEPTH} levels"),
                ));
            }
            let sub = open(dir, name, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
            for (entry, _) in entries(&sub, "")? {
                remove_tree_at(&sub, &entry, depth + 1)?;
            }
            match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
        Some(_) => match unlink(dir, name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_and_dotdot_are_refused_on_the_way() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host key").unwrap();
        let spool = tempfile::tempdir().unwrap();
        let s = spool.path();
        std::fs::create_dir(s.join("incoming")).unwrap();
        symlink(outside.path(), s.join("incoming/x")).unwrap();
        symlink(outside.path().join("secret"), s.join("incoming/log")).unwrap();
        let root = open_root(s).unwrap();
        for rel in [
            "incoming/x/secret",
            "incoming/log",
            "../secret",
            "/etc/passwd",
        ] {
            let e = open_file(&root, rel).unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
                ) || e.raw_os_error() == Some(libc_exdev()),
                "{rel}: {e}"
            );
        }
        // Removing the tree removes the links, not what they point at.
        let dir = open_dir(&root, "").unwrap();
        remove_tree(&dir, "incoming").unwrap();
        assert!(!s.join("incoming").exists());
        let mut text = String::new();
        File::open(outside.path().join("secret"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "host key");
    }

    fn libc_exdev() -> i32 {
        Errno::EXDEV as i32
    }

    #[test]
    fn rename_never_replaces() {
        let spool = tempfile::tempdir().unwrap();
        std::fs::create_dir(spool.path().join("a")).unwrap();
        std::fs::create_dir(spool.path().join("b")).unwrap();
        std::fs::write(spool.path().join("f"), "1").unwrap();
        let root = open_root(spool.path()).unwrap();
        let dir = open_dir(&root, "").unwrap();
        let e = rename_noreplace(&dir, "a", &dir, "b").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        rename_noreplace(&dir, "a", &dir, "c").unwrap();
        assert!(spool.path().join("c").is_dir() && !spool.path().join("a").exists());
        assert!(rename_noreplace(&dir, "f", &dir, "c").is_err());
    }

    #[test]
    fn a_fifo_is_not_a_file() {
        let spool = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&spool.path().join("f"), Mode::from_bits_truncate(0o644)).unwrap();
        let root = open_root(spool.path()).unwrap();
        let e = open_file(&root, "f").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn deep_trees_stop_at_the_limit_and_shallow_ones_go() {
        let spool = tempfile::tempdir().unwrap();
        let mut p = spool.path().join("t");
        for _ in 0..MAX_TREE_DEPTH + 2 {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let root = open_root(spool.path()).unwrap();
        let dir = open_dir(&root, "").unwrap();
        assert!(remove_tree(&dir, "t").is_err());
        std::fs::create_dir_all(spool.path().join("u/a/b")).unwrap();
        std::fs::write(spool.path().join("u/a/b/f"), "x").unwrap();
        remove_tree(&dir, "u").unwrap();
        assert!(!spool.path().join("u").exists());
    }
}
