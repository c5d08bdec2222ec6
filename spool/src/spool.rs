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
//! master/                   the masters' own: the lock, lease records and
//!                           the image signing key
//! ```
//!
//! Who may write what is the [`LAYOUT`]: `kiln-master init --agent-user`
//! gives each directory its owner and mode, and the agents' sshd account
//! (chrooted, SFTP only) can then write only where agents must.
//!
//! Every path handed to a [`SpoolFs`] is relative to the spool root and built
//! from checked names only (see [`crate::names`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use crate::beneath;

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
/// The master's image signing key (OpenSSH, unencrypted Ed25519, mode
/// 0600) and its public half.
pub const SIGNING_KEY: &str = "master/image-signing-key";
pub const SIGNING_KEY_PUB: &str = "master/image-signing-key.pub";

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
    /// The master writes; agents may open what they can name but not list
    /// it: owner the master, mode 0711. Published images: a deploy job's
    /// agent reads `images/<id>/` by its id.
    AgentsRead,
    /// Only the master, agents cannot even list it: owner the master, mode 0700.
    MasterOnly,
}

impl Access {
    /// The directory's mode.
    pub fn mode(self) -> u32 {
        match self {
            Access::MasterWrites => 0o755,
            Access::AgentsCreate => 0o1775,
            Access::AgentsRead => 0o711,
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
    (IMAGES, Access::AgentsRead),
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

    /// [`SpoolFs::create_exclusive`] for a secret (the master's signing
    /// key): where the filesystem has modes, only its owner may read it.
    fn create_private(&self, path: &str, data: &[u8]) -> io::Result<bool> {
        self.create_exclusive(path, data)
    }

    /// Reads a file of at most `max` bytes, `None` if it does not exist;
    /// a larger file is an `InvalidData` error and is not read whole.
    fn read_capped(&self, path: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        match self.open_read(path) {
            Ok(r) => read_at_most(r, path, max).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
        let root = self.root_fd()?;
        match beneath::mkdir(&root, MASTER_DIR, 0o700) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let file = File::from(beneath::open(
            &root,
            MASTER_LOCK,
            OFlag::O_WRONLY | OFlag::O_CREAT,
            0o600,
        )?);
        file.lock()?;
        Ok(MasterLock { _file: file })
    }
}

/// The master's exclusive lock on a local spool; released on drop.
pub struct MasterLock {
    _file: File,
}

fn sync(dir: &OwnedFd) -> io::Result<()> {
    // An O_PATH descriptor cannot be synced: open the directory for reading.
    File::from(beneath::open(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        0,
    )?)
    .sync_all()
}

impl LocalSpool {
    /// Opens a regular file beneath the spool for reading (and seeking),
    /// never through a symlink: for readers that want more than
    /// [`SpoolFs::open_read`], such as the tail of a job log.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        beneath::open_file(&self.root_fd()?, rel)
    }

    fn root_fd(&self) -> io::Result<OwnedFd> {
        beneath::open_root(&self.root)
    }

    /// The directory holding `rel`'s last component, and that component.
    fn parent_of<'a>(&self, rel: &'a str) -> io::Result<(OwnedFd, &'a str)> {
        let (dir, name) = beneath::split(rel)?;
        Ok((beneath::open_dir(&self.root_fd()?, dir)?, name))
    }

    /// Writes `data` to a new temporary file beside `name` in `dir` and syncs it.
    fn write_temp(&self, dir: &OwnedFd, name: &str, data: &[u8]) -> io::Result<String> {
        self.write_temp_mode(dir, name, data, 0o644)
    }

    /// Creates `path` with its full content, with `mode`, only if nothing
    /// exists there: the content is written under a temporary name, then
    /// linked into place, and link(2) fails if the target exists, so
    /// readers never see a half-written file.
    fn link_new(&self, path: &str, data: &[u8], mode: u32) -> io::Result<bool> {
        let (dir, name) = self.parent_of(path)?;
        let tmp = self.write_temp_mode(&dir, name, data, mode)?;
        let linked = beneath::link(&dir, &tmp, &dir, name);
        let _ = beneath::unlink(&dir, &tmp);
        match linked {
            Ok(()) => sync(&dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn write_temp_mode(
        &self,
        dir: &OwnedFd,
        name: &str,
        data: &[u8],
        mode: u32,
    ) -> io::Result<String> {
        let tmp = temp_name(name);
        let mut f = beneath::create_new(dir, &tmp, mode)?;
        // The mode as given, whatever the umask: a master running with
        // umask 077 must still leave jobs.toml and jobs/ readable to agents.
        let written = f
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .and_then(|()| f.write_all(data))
            .and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = beneath::unlink(dir, &tmp);
            return Err(e);
        }
        Ok(tmp)
    }
}

/// Every path is resolved beneath the spool root without following a
/// symlink (see [`beneath`]): agents write parts of the spool.
impl SpoolFs for LocalSpool {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        beneath::open_file(&self.root_fd()?, path)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn read_capped(&self, path: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let f = match beneath::open_file(&self.root_fd()?, path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        read_at_most(f, path, max).map(Some)
    }

    fn write_atomic(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let (dir, name) = self.parent_of(path)?;
        let tmp = self.write_temp(&dir, name, data)?;
        if let Err(e) = beneath::rename_replace(&dir, &tmp, name) {
            let _ = beneath::unlink(&dir, &tmp);
            return Err(e);
        }
        sync(&dir)
    }

    fn create_exclusive(&self, path: &str, data: &[u8]) -> io::Result<bool> {
        self.link_new(path, data, 0o644)
    }

    fn create_private(&self, path: &str, data: &[u8]) -> io::Result<bool> {
        self.link_new(path, data, 0o600)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let entries = match beneath::entries(&self.root_fd()?, dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = entries
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !n.starts_with(TMP_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        let (dir, name) = match self.parent_of(path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(beneath::kind(&dir, name)?.map(|(_, size)| size))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let r = self
            .parent_of(path)
            .and_then(|(dir, name)| beneath::unlink(&dir, name));
        match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn remove_dir_all(&self, path: &str) -> io::Result<()> {
        match self.parent_of(path) {
            Ok((dir, name)) => beneath::remove_tree(&dir, name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mkdir_all(&self, path: &str) -> io::Result<()> {
        let mut dir = self.root_fd()?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            match beneath::mkdir(&dir, comp, 0o755) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            dir = beneath::open_dir(&dir, comp)?;
        }
        Ok(())
    }

    fn rename_noclobber(&self, from: &str, to: &str) -> io::Result<()> {
        let (from_dir, from_name) = self.parent_of(from)?;
        let (to_dir, to_name) = self.parent_of(to)?;
        beneath::rename_noreplace(&from_dir, from_name, &to_dir, to_name)?;
        sync(&to_dir)
    }

    fn open_read(&self, path: &str) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            beneath::open_file(&self.root_fd()?, path)?,
        )))
    }

    fn create_write(&self, path: &str) -> io::Result<Box<dyn Write + '_>> {
        let (dir, name) = self.parent_of(path)?;
        let f = beneath::create_truncate(&dir, name, 0o644)?;
        // Readable by agents whatever the master's umask: a published image.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        Ok(Box::new(SyncOnDrop(Some(io::BufWriter::with_capacity(
            1 << 20,
            f,
        )))))
    }
}

/// Reads a whole file of at most `max` bytes; a longer one is an error that
/// says so, and no more than `max + 1` bytes are ever read.
pub fn read_at_most(r: impl Read, path: &str, max: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} is larger than {max} bytes"),
        ));
    }
    Ok(out)
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
