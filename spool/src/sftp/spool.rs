//! The spool over SFTP, as an agent sees it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ssh2::{ErrorCode, FileStat, OpenFlags, OpenType, RenameFlags, Sftp};

use super::posix_rename::PosixRename;
use super::session::{ServerConfig, SessionOptions, SshError, SshSession};
use crate::spool::{temp_name, SpoolFs, TMP_PREFIX};

/// Bytes gathered before they go to libssh2 at once: a multiple of its
/// 30,000-byte SFTP write.
pub const WRITE_BUFFER: usize = 32 * 30_000;
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

/// Collects writes into [`WRITE_BUFFER`]-sized pieces and keeps libssh2's
/// pipeline of SFTP writes full across them.
///
/// `libssh2_sftp_write` cuts what it is given into 30,000-byte SFTP writes,
/// sends them all, and returns once the first is acknowledged. It is then
/// called again with a slice that starts at the first byte it has not yet
/// reported written: the part it already sent is skipped, never read again,
/// and what follows goes out as new writes. So each piece is handed over
/// behind `in_flight` bytes of placeholder (the front of `buf`, whatever it
/// holds), and the writes of earlier pieces stay in flight while the next
/// one is gathered, instead of draining the pipeline every piece.
struct SftpWriter {
    file: Option<ssh2::File>,
    /// `IN_FLIGHT` bytes of placeholder, then the piece being gathered.
    buf: Vec<u8>,
    /// Bytes of the piece gathered so far, at `buf[IN_FLIGHT..]`.
    len: usize,
    /// Bytes handed to libssh2 that it has not reported written yet.
    in_flight: usize,
}

/// How many bytes may stay in flight when the next piece is handed over: a
/// few times the server's channel window, so that the server never waits.
const IN_FLIGHT: usize = 4 << 20;

impl SftpWriter {
    fn new(file: ssh2::File) -> Self {
        SftpWriter {
            file: Some(file),
            buf: vec![0; IN_FLIGHT + WRITE_BUFFER],
            len: 0,
            in_flight: 0,
        }
    }

    /// One call to libssh2 with the `len` bytes gathered (maybe none)
    /// behind the bytes in flight; returns the bytes reported written.
    fn write_once(&mut self, len: usize) -> io::Result<()> {
        let in_flight = self.in_flight;
        // Only the length of the placeholder counts, so when more is in
        // flight than the placeholder holds, any slice that long will do.
        let slice = if len == 0 {
            &self.buf[..in_flight]
        } else {
            &self.buf[IN_FLIGHT - in_flight..IN_FLIGHT + len]
        };
        let file = self.file.as_mut().expect("writer used after close");
        let n = match file.write(slice) {
            Ok(n) => n,
            Err(e) => {
                // libssh2 forgets what was in flight after an error.
                self.in_flight = 0;
                self.len = 0;
                return Err(e);
            }
        };
        if n == 0 {
            self.in_flight = 0;
            self.len = 0;
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.in_flight = in_flight + len - n;
        Ok(())
    }

    /// Hands the gathered piece to libssh2, first waiting for acknowledgements
    /// until no more than `IN_FLIGHT` bytes are outstanding.
    fn send_buffer(&mut self) -> io::Result<()> {
        while self.in_flight > IN_FLIGHT {
            self.write_once(0)?;
        }
        if self.len > 0 {
            let len = self.len;
            self.len = 0;
            self.write_once(len)?;
        }
        Ok(())
    }

    /// Sends what is gathered and waits until the server acknowledged every write.
    fn drain(&mut self) -> io::Result<()> {
        self.send_buffer()?;
        while self.in_flight > 0 {
            self.write_once(0)?;
        }
        Ok(())
    }

    fn file(&mut self) -> &mut ssh2::File {
        self.file.as_mut().expect("writer used after close")
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
        let n = data.len().min(WRITE_BUFFER - self.len);
        let at = IN_FLIGHT + self.len;
        self.buf[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        if self.len == WRITE_BUFFER {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write is acknowledged by the server once this returns. No
        // fsync here: for image chunks it halves the throughput, and a chunk
        // that a server crash truncates is caught by its size on resume or
        // by its BLAKE3 when the master verifies the upload.
        self.drain()
    }
}

impl Drop for SftpWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = self.drain();
            if let Some(mut f) = self.file.take() {
                let _ = f.close();
            }
        }
    }
}
