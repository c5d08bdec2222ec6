//! `posix-rename@openssh.com`: a rename that replaces its target atomically.
//!
//! SFTP version 3, which OpenSSH speaks, has no rename flags: its plain
//! rename fails when the target exists (sftp-server links, then unlinks).
//! libssh2 implements OpenSSH's extension as `libssh2_sftp_posix_rename_ex`,
//! which the `ssh2` crate does not wrap and whose `Sftp` handle it does not
//! expose. So this keeps a second SFTP channel of its own on the same
//! session, used for nothing else, and every call holds the session's lock
//! as `ssh2` itself does.

use std::ffi::{c_char, c_int};
use std::io;

use libssh2_sys as raw;

extern "C" {
    // libssh2_sftp.h, present since libssh2 1.11.1; linked through libssh2-sys.
    fn libssh2_sftp_posix_rename_ex(
        sftp: *mut raw::LIBSSH2_SFTP,
        source_filename: *const c_char,
        source_filename_len: usize,
        dest_filename: *const c_char,
        dest_filename_len: usize,
    ) -> c_int;
}

pub(crate) struct PosixRename {
    sftp: *mut raw::LIBSSH2_SFTP,
    session: ssh2::Session,
}

// The raw handle is only touched with the session's mutex held.
unsafe impl Send for PosixRename {}

impl PosixRename {
    pub(crate) fn open(session: &ssh2::Session) -> io::Result<Self> {
        let mut sess = session.raw();
        let raw_sess: *mut raw::LIBSSH2_SESSION = &mut *sess;
        // SAFETY: the session pointer is live (we hold its lock) and blocking.
        let sftp = unsafe { raw::libssh2_sftp_init(raw_sess) };
        if sftp.is_null() {
            return Err(session_error(
                raw_sess,
                "starting an sftp channel for renames",
            ));
        }
        drop(sess);
        Ok(PosixRename {
            sftp,
            session: session.clone(),
        })
    }

    /// Renames `from` to `to`, replacing `to` if it exists.
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut sess = self.session.raw();
        let raw_sess: *mut raw::LIBSSH2_SESSION = &mut *sess;
        // SAFETY: both handles are live while we hold the session lock; the
        // strings outlive the call, which copies them into its packet.
        let rc = unsafe {
            libssh2_sftp_posix_rename_ex(
                self.sftp,
                from.as_ptr().cast(),
                from.len(),
                to.as_ptr().cast(),
                to.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        if rc == raw::LIBSSH2_ERROR_SFTP_PROTOCOL {
            // SAFETY: as above.
            let code = unsafe { raw::libssh2_sftp_last_error(self.sftp) } as c_int;
            let kind = match code {
                raw::LIBSSH2_FX_NO_SUCH_FILE | raw::LIBSSH2_FX_NO_SUCH_PATH => {
                    io::ErrorKind::NotFound
                }
                raw::LIBSSH2_FX_PERMISSION_DENIED => io::ErrorKind::PermissionDenied,
                _ => io::ErrorKind::Other,
            };
            return Err(io::Error::new(
                kind,
                format!("posix-rename failed with sftp status {code}"),
            ));
        }
        Err(session_error(raw_sess, "posix-rename"))
    }
}

impl Drop for PosixRename {
    fn drop(&mut self) {
        let _sess = self.session.raw();
        // SAFETY: the handle came from libssh2_sftp_init and is freed once.
        unsafe {
            raw::libssh2_sftp_shutdown(self.sftp);
        }
    }
}

fn session_error(sess: *mut raw::LIBSSH2_SESSION, what: &str) -> io::Error {
    let mut msg: *mut c_char = std::ptr::null_mut();
    let mut len: c_int = 0;
    // SAFETY: the caller holds the session lock; with want_buf 0 the message
    // stays owned by libssh2 and is copied out before the lock is released.
    let rc = unsafe { raw::libssh2_session_last_error(sess, &mut msg, &mut len, 0) };
    let text = if msg.is_null() || len <= 0 {
        String::new()
    } else {
        // SAFETY: libssh2 gives a buffer of `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(msg as *const u8, len as usize) };
        String::from_utf8_lossy(bytes).into_owned()
    };
    let kind = if rc == raw::LIBSSH2_ERROR_TIMEOUT {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("{what}: libssh2 error {rc}: {text}"))
}
