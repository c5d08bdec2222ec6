//! Safe access to a directory tree that payloads and job files may have
//! filled with hostile symlinks. Every path is resolved by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from the tree's root:
//! a `..` or a symlink (absolute, or relative and climbing) that would leave
//! the tree fails with EXDEV instead of being followed. The last component
//! of a path is never followed; it is created, replaced or changed in place.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A directory whose paths are resolved beneath it.
pub struct Tree {
    root: OwnedFd,
    display: PathBuf,
}

/// A path split into its parent directory (an open fd beneath the root) and
/// the last component's name.
pub struct Slot {
    pub dir: OwnedFd,
    pub name: CString,
}

impl Slot {
    pub fn fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
}

/// Why a path inside a tree was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path:?} is absolute")]
    Absolute { path: PathBuf },
    #[error("{path:?} has a '..' component")]
    Parent { path: PathBuf },
    #[error("{path:?} resolves outside {root} through a symlink or '..'")]
    Escape { path: PathBuf, root: PathBuf },
    #[error("{what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type TreeResult<T> = std::result::Result<T, TreeError>;

fn cstr(b: &[u8]) -> CString {
    CString::new(b).unwrap_or_else(|_| CString::new("\u{fffd}").unwrap_or_default())
}

/// Splits a relative archive or target path into its plain components.
/// `.` components are dropped; absolute paths and `..` are refused.
pub fn plain_components(path: &Path) -> TreeResult<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(TreeError::Parent {
                    path: path.to_path_buf(),
                })
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(TreeError::Absolute {
                    path: path.to_path_buf(),
                })
            }
        }
    }
    Ok(out)
}

impl Tree {
    /// Opens `dir` as the root of a tree.
    pub fn open(dir: &Path) -> io::Result<Tree> {
        let f = File::open(dir)?;
        if !f.metadata()?.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Tree {
            root: f.into(),
            display: dir.to_path_buf(),
        })
    }

    /// A tree rooted at an open directory, such as one [`Tree::dir`]
    /// resolved beneath another tree.
    pub fn from_fd(root: OwnedFd, display: PathBuf) -> Tree {
        Tree { root, display }
    }

    pub fn display(&self) -> &Path {
        &self.display
    }

    /// Opens `rel` (plain components) beneath the root with `flags`.
    fn open_beneath(
        &self,
        rel: &[&OsStr],
        flags: libc::c_int,
        shown: &Path,
    ) -> TreeResult<OwnedFd> {
        let mut p = Vec::new();
        for (i, c) in rel.iter().enumerate() {
            if i > 0 {
                p.push(b'/');
            }
            p.extend_from_slice(c.as_bytes());
        }
        if p.is_empty() {
            p.push(b'.');
        }
        let c = cstr(&p);
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 reads the path and the open_how struct, both alive
        // for the call; the returned fd is owned by us.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => TreeError::Escape {
                    path: shown.to_path_buf(),
                    root: self.display.clone(),
                },
                _ => TreeError::Io {
                    what: "opening",
                    path: shown.to_path_buf(),
                    source: e,
                },
            });
        }
        // SAFETY: fd is a fresh descriptor returned by openat2.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// Opens directory `rel` beneath the root, creating missing directories
    /// (mode 0755, owned by the caller) on the way.
    pub fn dir(&self, rel: &Path) -> TreeResult<OwnedFd> {
        let comps = plain_components(rel)?;
        match self.open_beneath(&comps, libc::O_DIRECTORY | libc::O_RDONLY, rel) {
            Ok(fd) => return Ok(fd),
            Err(TreeError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let mut fd = self.open_beneath(&[], libc::O_DIRECTORY | libc::O_RDONLY, rel)?;
        for i in 0..comps.len() {
            match self.open_beneath(&comps[..=i], libc::O_DIRECTORY | libc::O_RDONLY, rel) {
                Ok(next) => fd = next,
                Err(TreeError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    let name = cstr(comps[i].as_bytes());
                    // SAFETY: mkdirat with a valid dirfd and NUL-terminated name.
                    let r = unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) };
                    if r != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(TreeError::Io {
                                what: "creating directory",
                                path: rel.to_path_buf(),
                                source: e,
                            });
                        }
                    }
                    fd =
                        self.open_beneath(&comps[..=i], libc::O_DIRECTORY | libc::O_RDONLY, rel)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(fd)
    }

    /// The parent directory of `rel` (created if missing) and its last name.
    /// `rel` must have at least one component.
    pub fn slot(&self, rel: &Path) -> TreeResult<Slot> {
        let comps = plain_components(rel)?;
        let Some((last, parent)) = comps.split_last() else {
            return Err(TreeError::Io {
                what: "naming",
                path: rel.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::EISDIR),
            });
        };
        let parent: PathBuf = parent.iter().collect();
        Ok(Slot {
            dir: self.dir(&parent)?,
            name: cstr(last.as_bytes()),
        })
    }

    /// Opens an existing file beneath the root for reading (following
    /// symlinks only while they stay inside).
    pub fn open_file(&self, rel: &Path) -> TreeResult<File> {
        let comps = plain_components(rel)?;
        Ok(File::from(self.open_beneath(
            &comps,
            libc::O_RDONLY,
            rel,
        )?))
    }

    /// Reads a text file; a missing file reads as `None`.
    pub fn read_optional(&self, rel: &Path) -> TreeResult<Option<String>> {
        use std::io::Read;
        let mut f = match self.open_file(rel) {
            Ok(f) => f,
            Err(TreeError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(|source| TreeError::Io {
            what: "reading",
            path: rel.to_path_buf(),
            source,
        })?;
        Ok(Some(s))
    }

    /// Writes a regular file atomically enough for a build: the old entry
    /// (file or symlink) is removed and a new file created in its place,
    /// never following a symlink at the last component.
    pub fn write_file(
        &self,
        rel: &Path,
        data: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> TreeResult<()> {
        use std::io::Write;
        let slot = self.slot(rel)?;
        let io = |what, source| TreeError::Io {
            what,
            path: rel.to_path_buf(),
            source,
        };
        slot.remove_non_dir().map_err(|e| io("replacing", e))?;
        let mut f = slot.create_file().map_err(|e| io("creating", e))?;
        f.write_all(data).map_err(|e| io("writing", e))?;
        set_owner_mode(&f, uid, gid, mode).map_err(|e| io("setting owner and mode of", e))?;
        f.sync_all().map_err(|e| io("flushing", e))?;
        Ok(())
    }

    /// Creates directory `rel` if missing and sets its owner and mode.
    pub fn make_dir(&self, rel: &Path, mode: u32, uid: u32, gid: u32) -> TreeResult<()> {
        let fd = self.dir(rel)?;
        let f = File::from(fd);
        set_owner_mode(&f, uid, gid, mode).map_err(|source| TreeError::Io {
            what: "setting owner and mode of",
            path: rel.to_path_buf(),
            source,
        })
    }

    /// Replaces `rel` with a symlink to `target`.
    pub fn symlink(&self, rel: &Path, target: &Path) -> TreeResult<()> {
        let slot = self.slot(rel)?;
        let io = |what, source| TreeError::Io {
            what,
            path: rel.to_path_buf(),
            source,
        };
        slot.remove_non_dir().map_err(|e| io("replacing", e))?;
        slot.symlink(target.as_os_str().as_bytes())
            .map_err(|e| io("creating symlink", e))
    }
}

fn last_err(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// chown then chmod (chown clears set-id bits).
pub fn set_owner_mode(f: &File, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscalls on an open descriptor.
    last_err(unsafe { libc::fchown(f.as_raw_fd(), uid, gid) })?;
    // SAFETY: as above.
    last_err(unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) })
}

impl Slot {
    /// Removes whatever non-directory is at the slot; a missing entry is fine,
    /// a directory is refused.
    pub fn remove_non_dir(&self) -> io::Result<()> {
        // SAFETY: unlinkat with a valid dirfd and name.
        let r = unsafe { libc::unlinkat(self.fd(), self.name.as_ptr(), 0) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            Some(libc::EISDIR) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a directory is in the way",
            )),
            _ => Err(e),
        }
    }

    /// Creates a new regular file (mode 0600 until its real mode is set).
    pub fn create_file(&self) -> io::Result<File> {
        // SAFETY: openat with a valid dirfd and name; O_EXCL|O_NOFOLLOW never
        // follows a symlink planted at the name.
        let fd = unsafe {
            libc::openat(
                self.fd(),
                self.name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn symlink(&self, target: &[u8]) -> io::Result<()> {
        let t = CString::new(target).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: symlinkat with valid strings and dirfd.
        last_err(unsafe { libc::symlinkat(t.as_ptr(), self.fd(), self.name.as_ptr()) })
    }

    /// Owner of the entry itself, never a symlink's target.
    pub fn lchown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: fchownat with AT_SYMLINK_NOFOLLOW on a valid dirfd and name.
        last_err(unsafe {
            libc::fchownat(
                self.fd(),
                self.name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    /// Modification time of the entry itself, never a symlink's target.
    pub fn set_mtime(&self, secs: u64) -> io::Result<()> {
        let t = libc::timespec {
            tv_sec: secs as _,
            tv_nsec: 0,
        };
        let times = [t, t];
        // SAFETY: utimensat reads two timespecs.
        last_err(unsafe {
            libc::utimensat(
                self.fd(),
                self.name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    /// Kind of the entry at the slot without following it (None if missing).
    pub fn kind(&self) -> io::Result<Option<libc::mode_t>> {
        // SAFETY: fstatat fills the stat struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, with a valid dirfd and name.
        let r = unsafe {
            libc::fstatat(
                self.fd(),
                self.name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(Some(st.st_mode & libc::S_IFMT));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}
