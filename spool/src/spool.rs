//! The spool: the directory on a job server that is the whole shared state.
//!
//! ```text
//! jobs.toml                 job list in the order agents take jobs (master writes)
//! jobs/<id>.toml            job specs as submitted
//! payloads/<name>           payload archives, pinned by BLAKE3 in the jobs
//! leases/<id>               one agent's claim on one job (agent creates exclusively)
//! status/<id>.toml          the holder's heartbeat: phase, progress, message
//! incoming/<id>/<token>/    an upload in progress; manifest.toml appears last
//! images/<id>/              published images (appear whole, by rename)
//! history/<id>.toml         finished jobs, with their last status
//! logs/<id>.log             a holder's job log while it works
//! master/                   the masters' own: the lock, lease records
//! ```
//!
//! Who may write what is the [`LAYOUT`]: `kiln-master init --agent-user`
//! gives each directory its owner and mode, and the agents' sshd account
//! (chrooted, SFTP only) can then write only where agents must.
//!
//! Every path handed to a [`SpoolFs`] is relative to the spool root and built
//! from checked names only (see [`crate::names`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub const JOB_LIST: &str = "jobs.toml";
pub const JOBS: &str = "jobs";
pub const PAYLOADS: &str = "payloads";
pub const LEASES: &str = "leases";
pub const STATUS: &str = "status";
pub const INCOMING: &str = "incoming";
pub const IMAGES: &str = "images";
pub const HISTORY: &str = "history";
pub const LOGS: &str = "logs";
/// The masters' private directory: the lock and the master's own records.
pub const MASTER_DIR: &str = "master";
/// The masters' lock, so that the CLI, `serve` and the TUI never interleave.
pub const MASTER_LOCK: &str = "master/lock";

/// Who may write a spool directory, and so its owner and mode once
/// `kiln-master init --agent-user USER` has run as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The master writes, agents read: owner the master, mode 0755.
    MasterWrites,
    /// Agents create entries; the sticky bit keeps them from removing or
    /// renaming what they did not make: owner the master, group the
    /// agents' group, mode 01775.
    AgentsCreate,
    /// Only the master, agents cannot even list it: owner the master, mode 0700.
    MasterOnly,
}

impl Access {
    /// The directory's mode.
    pub fn mode(self) -> u32 {
        match self {
            Access::MasterWrites => 0o755,
            Access::AgentsCreate => 0o1775,
            Access::MasterOnly => 0o700,
        }
    }
}

/// Every directory of a spool with who may write it. The spool root itself
/// is [`Access::MasterWrites`] (it holds `jobs.toml`).
pub const LAYOUT: [(&str, Access); 9] = [
    (JOBS, Access::MasterWrites),
    (PAYLOADS, Access::MasterWrites),
    (LEASES, Access::AgentsCreate),
    (STATUS, Access::AgentsCreate),
    (INCOMING, Access::AgentsCreate),
    (LOGS, Access::AgentsCreate),
    (IMAGES, Access::MasterOnly),
    (HISTORY, Access::MasterOnly),
    (MASTER_DIR, Access::MasterOnly),
];

/// Directories that make up a spool, created by `init`.
pub const DIRS: [&str; 9] = {
    let mut d = [""; 9];
    let mut i = 0;
    while i < LAYOUT.len() {
        d[i] = LAYOUT[i].0;
        i += 1;
    }
    d
};
/// Prefix of temporary files; listings skip them.
pub const TMP_PREFIX: &str = ".tmp.";

pub fn job_path(id: &str) -> String {
    format!("{JOBS}/{id}.toml")
}
pub fn lease_path(id: &str) -> String {
    format!("{LEASES}/{id}")
}
pub fn status_path(id: &str) -> String {
    format!("{STATUS}/{id}.toml")
}
pub fn payload_path(name: &str) -> String {
    format!("{PAYLOADS}/{name}")
}
pub fn incoming_dir(id: &str, token: &str) -> String {
    format!("{INCOMING}/{id}/{token}")
}
pub fn image_dir(id: &str) -> String {
    format!("{IMAGES}/{id}")
}
pub fn history_path(id: &str) -> String {
    format!("{HISTORY}/{id}.toml")
}
pub fn log_path(id: &str) -> String {
    format!("{LOGS}/{id}.log")
}

/// What the spool rules need from a filesystem: the local one for the master,
/// SFTP for agents. Paths are relative to the spool root. `NotFound` and
/// `AlreadyExists` errors keep their `io::ErrorKind`.
pub trait SpoolFs {
    /// Reads a whole file.
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Replaces a file atomically: readers see the old or the new content, never a mix.
    fn write_atomic(&self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Creates a file with its full content only if nothing exists at `path`.
    /// Returns `Ok(false)` if something already did. Nobody sees a partial file.
    fn create_exclusive(&self, path: &str, data: &[u8]) -> io::Result<bool>;
    /// Names in a directory, without temporary files; empty if it does not exist.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Size of a file, or `None` if it does not exist.
    fn size(&self, path: &str) -> io::Result<Option<u64>>;
    /// Removes a file; succeeds if it was already gone.
    fn remove(&self, path: &str) -> io::Result<()>;
    /// Removes a directory tree; succeeds if it was already gone.
    fn remove_dir_all(&self, path: &str) -> io::Result<()>;
    /// Creates a directory and its parents.
    fn mkdir_all(&self, path: &str) -> io::Result<()>;
    /// Renames, failing with `AlreadyExists` rather than replacing `to`.
    fn rename_noclobber(&self, from: &str, to: &str) -> io::Result<()>;
    /// Opens a file for streaming reads.
    fn open_read(&self, path: &str) -> io::Result<Box<dyn Read + '_>>;
    /// Creates (or truncates) a file for streaming writes; the caller makes it
    /// visible under its final name with `rename_noclobber` when complete.
    fn create_write(&self, path: &str) -> io::Result<Box<dyn Write + '_>>;

    fn exists(&self, path: &str) -> io::Result<bool> {
        Ok(self.size(path)?.is_some())
    }

    /// Reads a file, `None` if it does not exist.
    fn read_opt(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A unique temporary name beside `path`.
pub fn temp_name(path: &str) -> String {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    format!(
        "{dir}{TMP_PREFIX}{name}.{}.{}",
        std::process::id(),
        random_hex(6)
    )
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf).expect("the OS random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A spool on a local filesystem, as the master sees it.
#[derive(Debug, Clone)]
pub struct LocalSpool {
    root: PathBuf,
}

impl LocalSpool {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalSpool { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Takes the master's lock, held until the guard drops, so that the CLI,
    /// `serve` and the TUI never interleave their read-modify-write of `jobs.toml`.
    pub fn lock(&self) -> io::Result<MasterLock> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.root.join(MASTER_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(self.root.join(MASTER_LOCK))?;
        file.lock()?;
        Ok(MasterLock { _file: file })
    }
}

/// `O_NOFOLLOW`: the lock is never taken through a symlink.
fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// The master's exclusive lock on a local spool; released on drop.
pub struct MasterLock {
    _file: File,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("."))
}

impl SpoolFs for LocalSpool {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(path))
    }

    fn write_atomic(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let target = self.path(path);
        let tmp = self.path(&temp_name(path));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)?;
            sync_dir(parent(&target))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn create_exclusive(&self, path: &str, data: &[u8]) -> io::Result<bool> {
        // Write the whole content under a temporary name, then link it into
        // place: link(2) fails if the target exists, and readers never see a
        // half-written lease.
        let target = self.path(path);
        let tmp = self.path(&temp_name(path));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            match fs::hard_link(&tmp, &target) {
                Ok(()) => {
                    sync_dir(parent(&target))?;
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let rd = match fs::read_dir(self.path(dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in rd {
            let name = entry?.file_name();
            if let Some(n) = name.to_str() {
                if !n.starts_with(TMP_PREFIX) {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        match fs::metadata(self.path(path)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        match fs::remove_file(self.path(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn remove_dir_all(&self, path: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.path(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn mkdir_all(&self, path: &str) -> io::Result<()> {
        fs::create_dir_all(self.path(path))
    }

    fn rename_noclobber(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        if fs::symlink_metadata(&from)?.is_dir() {
            // Directories cannot be linked. Only the master renames
            // directories (publishing images), under its lock, so the check
            // cannot race another renamer.
            if fs::symlink_metadata(&to).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", to.display()),
                ));
            }
            fs::rename(&from, &to)?;
        } else {
            // link(2) refuses an existing target atomically, as OpenSSH's
            // sftp-server does for a plain SFTP rename.
            fs::hard_link(&from, &to)?;
            fs::remove_file(&from)?;
        }
        sync_dir(parent(&to))
    }

    fn open_read(&self, path: &str) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            File::open(self.path(path))?,
        )))
    }

    fn create_write(&self, path: &str) -> io::Result<Box<dyn Write + '_>> {
        Ok(Box::new(SyncOnDrop(Some(io::BufWriter::with_capacity(
            1 << 20,
            File::create(self.path(path))?,
        )))))
    }
}

/// A buffered file writer whose `flush` also syncs the file to disk.
struct SyncOnDrop(Option<io::BufWriter<File>>);

impl Write for SyncOnDrop {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.as_mut().expect("writer used after close").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        let w = self.0.as_mut().expect("writer used after close");
        w.flush()?;
        w.get_ref().sync_all()
    }
}

impl Drop for SyncOnDrop {
    fn drop(&mut self) {
        if let Some(mut w) = self.0.take() {
            let _ = w.flush();
        }
    }
}
