//! The spool over SFTP, as an agent sees it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ssh2::{ErrorCode, FileStat, OpenFlags, OpenType, RenameFlags, Sftp};

use super::posix_rename::PosixRename;
use super::session::{ServerConfig, SessionOptions, SshError, SshSession};
use crate::spool::{temp_name, SpoolFs, TMP_PREFIX};

/// Bytes handed to libssh2 per write: a multiple of its 30,000-byte SFTP
/// packet, large enough that it keeps some hundred writes in flight.
pub const WRITE_BUFFER: usize = 128 * 30_000;
const READ_BUFFER: usize = 4 << 20;

const FX_FAILURE: i32 = 4;
const FX_OP_UNSUPPORTED: i32 = 8;

/// A spool on a job server, reached over SFTP. Paths are relative to the
/// spool root from the server's config.
pub struct SftpSpool {
    // Fields drop in order: both SFTP channels before the session.
    renamer: Mutex<Option<PosixRename>>,
    sftp: Sftp,
    ssh: SshSession,
    root: String,
}

impl SftpSpool {
    /// Connects to `server` and opens its spool.
    pub fn connect(server: &ServerConfig, opts: &SessionOptions) -> Result<Self, SshError> {
        let ssh = SshSession::connect(server, opts)?;
        Self::open(ssh, &server.spool)
    }

    /// Opens the spool at `root` on an established session.
    pub fn open(ssh: SshSession, root: &str) -> Result<Self, SshError> {
        let sftp = ssh.session().sftp().map_err(|source| SshError::Ssh {
            what: format!("starting sftp on {}", ssh.address()),
            source,
        })?;
        Ok(SftpSpool {
            renamer: Mutex::new(None),
            sftp,
            ssh,
            root: root.to_string(),
        })
    }

    pub fn session(&self) -> &SshSession {
        &self.ssh
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// The server's path for a spool path.
    pub fn remote_path(&self, rel: &str) -> String {
        if self.root.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.root.trim_end_matches('/'))
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        // Keep the link alive between long pauses; a failure here shows up
        // in the operation that follows.
        let _ = self.ssh.keepalive();
        PathBuf::from(self.remote_path(rel))
    }

    fn stat_opt(&self, path: &Path) -> io::Result<Option<FileStat>> {
        match self.sftp.stat(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                let e = io::Error::from(e);
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Writes `data` to a new file at `path`, fully, and syncs it.
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut w = SftpWriter::new(self.create(path)?);
        w.write_all(data)?;
        w.finish()
    }

    fn create(&self, path: &Path) -> io::Result<ssh2::File> {
        Ok(self.sftp.open_mode(
            path,
            OpenFlags::WRITE | OpenFlags::TRUNCATE,
            0o644,
            OpenType::File,
        )?)
    }

    /// A plain SFTP rename: OpenSSH's sftp-server links the new name and
    /// unlinks the old, so it fails if `to` exists. The failure comes back
    /// as a bare `SSH_FX_FAILURE`; a look at `to` tells the cases apart.
    fn rename_plain(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self
            .sftp
            .rename(from, to, Some(RenameFlags::ATOMIC | RenameFlags::NATIVE))
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let failure = e.code() == ErrorCode::SFTP(FX_FAILURE);
                let e = io::Error::from(e);
                if failure && self.stat_opt(to)?.is_some() {
                    Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists", to.display()),
                    ))
                } else {
                    Err(e)
                }
            }
        }
    }

    fn posix_rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut renamer = self.renamer.lock().unwrap_or_else(|p| p.into_inner());
        if renamer.is_none() {
            *renamer = Some(PosixRename::open(self.ssh.session())?);
        }
        let r = renamer.as_ref().expect("set above");
        r.rename(&from.to_string_lossy(), &to.to_string_lossy())
    }

    fn remove_tree(&self, path: &Path) -> io::Result<()> {
        for (entry, stat) in self.sftp.readdir(path)? {
            if stat.is_dir() {
                self.remove_tree(&entry)?;
            } else {
                not_found_ok(self.sftp.unlink(&entry))?;
            }
        }
        Ok(self.sftp.rmdir(path)?)
    }
}

fn not_found_ok(r: Result<(), ssh2::Error>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = io::Error::from(e);
            if e.kind() == io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

impl SpoolFs for SftpSpool {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let mut f = self.sftp.open(self.p(path))?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    fn write_atomic(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let target = self.p(path);
        let tmp = self.p(&temp_name(path));
        let result = self
            .write_file(&tmp, data)
            .and_then(|()| self.posix_rename(&tmp, &target));
        if result.is_err() {
            let _ = self.sftp.unlink(&tmp);
        }
        result
    }

    fn create_exclusive(&self, path: &str, data: &[u8]) -> io::Result<bool> {
        // The whole content goes under a temporary name first; the plain
        // rename then refuses an existing target atomically (link(2) on the
        // server), so nobody sees a half-written file.
        let target = self.p(path);
        let tmp = self.p(&temp_name(path));
        let result =
            self.write_file(&tmp, data)
                .and_then(|()| match self.rename_plain(&tmp, &target) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                });
        if !matches!(result, Ok(true)) {
            let _ = self.sftp.unlink(&tmp);
        }
        result
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let entries = match self.sftp.readdir(self.p(dir)) {
            Ok(e) => e,
            Err(e) => {
                let e = io::Error::from(e);
                return if e.kind() == io::ErrorKind::NotFound {
                    Ok(vec![])
                } else {
                    Err(e)
                };
            }
        };
        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|(p, _)| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| !n.starts_with(TMP_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        Ok(self.stat_opt(&self.p(path))?.map(|s| s.size.unwrap_or(0)))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        not_found_ok(self.sftp.unlink(&self.p(path)))
    }

    fn remove_dir_all(&self, path: &str) -> io::Result<()> {
        match self.remove_tree(&self.p(path)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn mkdir_all(&self, path: &str) -> io::Result<()> {
        let full = self.p(path);
        if self.stat_opt(&full)?.is_some_and(|s| s.is_dir()) {
            return Ok(());
        }
        let mut prefix = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            let p = PathBuf::from(self.remote_path(&prefix));
            if let Err(e) = self.sftp.mkdir(&p, 0o755) {
                // It may exist already, or another agent just made it.
                match self.stat_opt(&p)? {
                    Some(s) if s.is_dir() => {}
                    _ => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    fn rename_noclobber(&self, from: &str, to: &str) -> io::Result<()> {
        self.rename_plain(&self.p(from), &self.p(to))
    }

    fn open_read(&self, path: &str) -> io::Result<Box<dyn Read + '_>> {
        let f = self.sftp.open(self.p(path))?;
        Ok(Box::new(io::BufReader::with_capacity(READ_BUFFER, f)))
    }

    fn create_write(&self, path: &str) -> io::Result<Box<dyn Write + '_>> {
        Ok(Box::new(SftpWriter::new(self.create(&self.p(path))?)))
    }
}

/// Collects writes into [`WRITE_BUFFER`]-sized pieces for libssh2, which
/// pipelines each piece as many SFTP writes.
struct SftpWriter {
    file: Option<ssh2::File>,
    buf: Vec<u8>,
}

impl SftpWriter {
    fn new(file: ssh2::File) -> Self {
        SftpWriter {
            file: Some(file),
            buf: Vec::with_capacity(WRITE_BUFFER),
        }
    }

    fn file(&mut self) -> &mut ssh2::File {
        self.file.as_mut().expect("writer used after close")
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.file().write_all(&buf);
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    /// Flushes, syncs (`fsync@openssh.com`) and closes, reporting errors
    /// that a drop would swallow. For the small files whose loss in a server
    /// crash would matter: leases, status, lists, manifests.
    fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        match self.file().fsync() {
            Err(e) if e.code() == ErrorCode::SFTP(FX_OP_UNSUPPORTED) => {}
            r => r?,
        }
        let mut f = self.file.take().expect("closed once");
        Ok(f.close()?)
    }
}

impl Write for SftpWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= WRITE_BUFFER {
            // Big writes go straight through, in whole buffers.
            let n = data.len() - data.len() % WRITE_BUFFER;
            self.file().write_all(&data[..n])?;
            return Ok(n);
        }
        let n = data.len().min(WRITE_BUFFER - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == WRITE_BUFFER {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write is acknowledged by the server once this returns. No
        // fsync here: for image chunks it halves the throughput, and a chunk
        // that a server crash truncates is caught by its size on resume or
        // by its BLAKE3 when the master verifies the upload.
        self.send_buffer()
    }
}

impl Drop for SftpWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = self.send_buffer();
            if let Some(mut f) = self.file.take() {
                let _ = f.close();
            }
        }
    }
}
