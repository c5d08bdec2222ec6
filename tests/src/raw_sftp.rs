//! SFTP version 3 by hand, on a channel of an ssh2 session: every request a
//! hostile client may send, including the OpenSSH extensions libssh2 does
//! not offer (hardlink, lsetstat, copy-data), each answered with the
//! server's own status code.

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_EXTENDED: u8 = 200;

const ATTR_PERMISSIONS: u32 = 0x4;

/// `SSH_FXF_*` open flags.
pub const READ: u32 = 0x1;
pub const WRITE: u32 = 0x2;
pub const APPEND: u32 = 0x4;
pub const CREAT: u32 = 0x8;
pub const TRUNC: u32 = 0x10;
pub const EXCL: u32 = 0x20;

/// `SSH_FX_*` status codes.
pub const FX_OK: u32 = 0;
pub const FX_EOF: u32 = 1;
pub const FX_NO_SUCH_FILE: u32 = 2;
pub const FX_PERMISSION_DENIED: u32 = 3;
pub const FX_FAILURE: u32 = 4;

/// The server's refusal: its status code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: u32,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.code {
            FX_EOF => "eof",
            FX_NO_SUCH_FILE => "no such file",
            FX_PERMISSION_DENIED => "permission denied",
            FX_FAILURE => "failure",
            5 => "bad message",
            8 => "unsupported",
            _ => "status",
        };
        write!(f, "{name} ({}): {}", self.code, self.message)
    }
}

/// What a request got: `Ok` with its reply, or the server's refusal.
pub type Reply<T> = std::result::Result<T, Refused>;

/// An SFTP client speaking raw packets on its own channel.
pub struct RawSftp {
    channel: ssh2::Channel,
    next_id: u32,
}

/// A server-side file or directory handle.
#[derive(Debug, Clone)]
pub struct Handle(Vec<u8>);

impl RawSftp {
    /// Opens the `sftp` subsystem on `session` (sshd forces internal-sftp
    /// on the agents' account anyway) and says hello.
    pub fn open(session: &ssh2::Session) -> Result<Self> {
        let mut channel = session
            .channel_session()
            .context("opening a session channel")?;
        channel
            .subsystem("sftp")
            .context("starting the sftp subsystem")?;
        let mut s = RawSftp {
            channel,
            next_id: 1,
        };
        s.send_packet(FXP_INIT, &3u32.to_be_bytes())?;
        let (ty, _) = s.recv_packet()?;
        if ty != FXP_VERSION {
            bail!("the server answered INIT with packet type {ty}");
        }
        Ok(s)
    }

    fn send_packet(&mut self, ty: u8, body: &[u8]) -> Result<()> {
        let len = u32::try_from(body.len() + 1).context("packet too long")?;
        let mut pkt = Vec::with_capacity(body.len() + 5);
        pkt.extend_from_slice(&len.to_be_bytes());
        pkt.push(ty);
        pkt.extend_from_slice(body);
        self.channel
            .write_all(&pkt)
            .context("sending an sftp packet")?;
        self.channel.flush().context("sending an sftp packet")
    }

    fn recv_packet(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut len = [0u8; 4];
        self.channel
            .read_exact(&mut len)
            .context("reading an sftp reply")?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > 1 << 20 {
            bail!("an sftp reply of {len} bytes");
        }
        let mut body = vec![0u8; len];
        self.channel
            .read_exact(&mut body)
            .context("reading an sftp reply")?;
        let ty = body.remove(0);
        Ok((ty, body))
    }

    /// Sends a request with a fresh id; returns the reply's type and the
    /// bytes after its id, or the refusal a non-OK status carries.
    fn request(&mut self, ty: u8, fields: &[u8]) -> Result<Reply<(u8, Vec<u8>)>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(fields);
        self.send_packet(ty, &body)?;
        let (rty, reply) = self.recv_packet()?;
        let mut r = Reader(&reply);
        let rid = r.u32()?;
        if rid != id {
            bail!("reply for request {rid}, expected {id}");
        }
        if rty == FXP_STATUS {
            let code = r.u32()?;
            let message = String::from_utf8_lossy(r.string()?).into_owned();
            if code != FX_OK {
                return Ok(Err(Refused { code, message }));
            }
        }
        Ok(Ok((rty, r.0.to_vec())))
    }

    fn expect_status(&mut self, ty: u8, fields: &[u8]) -> Result<Reply<()>> {
        Ok(self.request(ty, fields)?.map(|_| ()))
    }

    fn expect_handle(&mut self, ty: u8, fields: &[u8]) -> Result<Reply<Handle>> {
        match self.request(ty, fields)? {
            Err(r) => Ok(Err(r)),
            Ok((FXP_HANDLE, rest)) => Ok(Ok(Handle(Reader(&rest).string()?.to_vec()))),
            Ok((t, _)) => bail!("expected a handle, got packet type {t}"),
        }
    }

    pub fn open_file(&mut self, path: &str, flags: u32) -> Result<Reply<Handle>> {
        let mut f = Fields::default().string(path.as_bytes()).u32(flags);
        f = f.attrs(if flags & CREAT != 0 {
            Some(0o644)
        } else {
            None
        });
        self.expect_handle(FXP_OPEN, &f.0)
    }

    pub fn close(&mut self, h: &Handle) -> Result<Reply<()>> {
        self.expect_status(FXP_CLOSE, &Fields::default().string(&h.0).0)
    }

    pub fn write_at(&mut self, h: &Handle, offset: u64, data: &[u8]) -> Result<Reply<()>> {
        let f = Fields::default().string(&h.0).u64(offset).string(data);
        self.expect_status(FXP_WRITE, &f.0)
    }

    /// Reads up to `len` bytes at `offset`; empty at the end of the file.
    pub fn read_at(&mut self, h: &Handle, offset: u64, len: u32) -> Result<Reply<Vec<u8>>> {
        let f = Fields::default().string(&h.0).u64(offset).u32(len);
        match self.request(FXP_READ, &f.0)? {
            Err(r) if r.code == FX_EOF => Ok(Ok(vec![])),
            Err(r) => Ok(Err(r)),
            Ok((FXP_DATA, rest)) => Ok(Ok(Reader(&rest).string()?.to_vec())),
            Ok((t, _)) => bail!("expected data, got packet type {t}"),
        }
    }

    /// Opens, writes `data` from offset 0, closes: the whole exchange of a
    /// file upload, refused at whichever step the server refuses.
    pub fn put(&mut self, path: &str, flags: u32, data: &[u8]) -> Result<Reply<()>> {
        let h = match self.open_file(path, WRITE | flags)? {
            Ok(h) => h,
            Err(r) => return Ok(Err(r)),
        };
        let wrote = self.write_at(&h, 0, data)?;
        let closed = self.close(&h)?;
        Ok(wrote.and(closed))
    }

    /// Reads a whole file (up to `limit` bytes).
    pub fn get(&mut self, path: &str, limit: usize) -> Result<Reply<Vec<u8>>> {
        let h = match self.open_file(path, READ)? {
            Ok(h) => h,
            Err(r) => return Ok(Err(r)),
        };
        let mut out = Vec::new();
        while out.len() < limit {
            match self.read_at(&h, out.len() as u64, 32 * 1024)? {
                Ok(d) if d.is_empty() => break,
                Ok(d) => out.extend_from_slice(&d),
                Err(r) => {
                    let _ = self.close(&h)?;
                    return Ok(Err(r));
                }
            }
        }
        let _ = self.close(&h)?;
        Ok(Ok(out))
    }

    /// The names in a directory.
    pub fn list(&mut self, path: &str) -> Result<Reply<Vec<String>>> {
        let h =
            match self.expect_handle(FXP_OPENDIR, &Fields::default().string(path.as_bytes()).0)? {
                Ok(h) => h,
                Err(r) => return Ok(Err(r)),
            };
        let mut names = Vec::new();
        loop {
            match self.request(FXP_READDIR, &Fields::default().string(&h.0).0)? {
                Err(r) if r.code == FX_EOF => break,
                Err(r) => {
                    let _ = self.close(&h)?;
                    return Ok(Err(r));
                }
                Ok((FXP_NAME, rest)) => {
                    let mut r = Reader(&rest);
                    for _ in 0..r.u32()? {
                        names.push(String::from_utf8_lossy(r.string()?).into_owned());
                        r.string()?; // long name
                        r.skip_attrs()?;
                    }
                }
                Ok((t, _)) => bail!("expected names, got packet type {t}"),
            }
        }
        let _ = self.close(&h)?;
        Ok(Ok(names))
    }

    pub fn remove(&mut self, path: &str) -> Result<Reply<()>> {
        self.expect_status(FXP_REMOVE, &Fields::default().string(path.as_bytes()).0)
    }

    pub fn mkdir(&mut self, path: &str) -> Result<Reply<()>> {
        let f = Fields::default().string(path.as_bytes()).attrs(Some(0o755));
        self.expect_status(FXP_MKDIR, &f.0)
    }

    pub fn rmdir(&mut self, path: &str) -> Result<Reply<()>> {
        self.expect_status(FXP_RMDIR, &Fields::default().string(path.as_bytes()).0)
    }

    /// A plain SFTP rename (OpenSSH: link, then unlink; never replaces).
    pub fn rename(&mut self, from: &str, to: &str) -> Result<Reply<()>> {
        let f = Fields::default()
            .string(from.as_bytes())
            .string(to.as_bytes());
        self.expect_status(FXP_RENAME, &f.0)
    }

    /// `SSH_FXP_SYMLINK` with its two paths in wire order. OpenSSH reads
    /// them as (target, link), the reverse of the draft; callers try both.
    pub fn symlink(&mut self, first: &str, second: &str) -> Result<Reply<()>> {
        let f = Fields::default()
            .string(first.as_bytes())
            .string(second.as_bytes());
        self.expect_status(FXP_SYMLINK, &f.0)
    }

    pub fn setstat(&mut self, path: &str, mode: u32) -> Result<Reply<()>> {
        let f = Fields::default().string(path.as_bytes()).attrs(Some(mode));
        self.expect_status(FXP_SETSTAT, &f.0)
    }

    pub fn fsetstat(&mut self, h: &Handle, mode: u32) -> Result<Reply<()>> {
        let f = Fields::default().string(&h.0).attrs(Some(mode));
        self.expect_status(FXP_FSETSTAT, &f.0)
    }

    fn extended(&mut self, name: &str, fields: Fields) -> Result<Reply<()>> {
        let mut f = Fields::default().string(name.as_bytes());
        f.0.extend_from_slice(&fields.0);
        self.expect_status(FXP_EXTENDED, &f.0)
    }

    /// `hardlink@openssh.com`: a new name `link` for `existing`.
    pub fn hardlink(&mut self, existing: &str, link: &str) -> Result<Reply<()>> {
        let f = Fields::default()
            .string(existing.as_bytes())
            .string(link.as_bytes());
        self.extended("hardlink@openssh.com", f)
    }

    /// `posix-rename@openssh.com`: a rename that replaces `to`.
    pub fn posix_rename(&mut self, from: &str, to: &str) -> Result<Reply<()>> {
        let f = Fields::default()
            .string(from.as_bytes())
            .string(to.as_bytes());
        self.extended("posix-rename@openssh.com", f)
    }

    /// `lsetstat@openssh.com`: setstat without following a symlink.
    pub fn lsetstat(&mut self, path: &str, mode: u32) -> Result<Reply<()>> {
        let f = Fields::default().string(path.as_bytes()).attrs(Some(mode));
        self.extended("lsetstat@openssh.com", f)
    }

    /// `copy-data`: the server copies `len` bytes (0: up to the end)
    /// between two open handles.
    pub fn copy_data(&mut self, from: &Handle, len: u64, to: &Handle) -> Result<Reply<()>> {
        let f = Fields::default()
            .string(&from.0)
            .u64(0)
            .u64(len)
            .string(&to.0)
            .u64(0);
        self.extended("copy-data", f)
    }
}

#[derive(Default)]
struct Fields(Vec<u8>);

impl Fields {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn string(self, s: &[u8]) -> Self {
        let mut me = self.u32(s.len() as u32);
        me.0.extend_from_slice(s);
        me
    }
    fn attrs(self, mode: Option<u32>) -> Self {
        match mode {
            Some(m) => self.u32(ATTR_PERMISSIONS).u32(m),
            None => self.u32(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("a short sftp reply");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn skip_attrs(&mut self) -> Result<()> {
        let flags = self.u32()?;
        if flags & 0x1 != 0 {
            self.take(8)?; // size
        }
        if flags & 0x2 != 0 {
            self.take(8)?; // uid, gid
        }
        if flags & 0x4 != 0 {
            self.take(4)?; // permissions
        }
        if flags & 0x8 != 0 {
            self.take(8)?; // atime, mtime
        }
        if flags & 0x8000_0000 != 0 {
            for _ in 0..self.u32()? {
                self.string()?;
                self.string()?;
            }
        }
        Ok(())
    }
}
