//! The agent's way into a job server: an SSH session with a pinned host key
//! ([`SshSession`]) and the spool over SFTP ([`SftpSpool`]).
//!
//! Everything here talks to OpenSSH's `sshd` through libssh2 (the `ssh2`
//! crate), blocking, with a timeout on every wait so that a dead link is an
//! error, never a hang.

mod host_key;
mod posix_rename;
mod session;
mod spool;

pub use host_key::{fingerprint, HostKey};
pub use session::{ServerConfig, SessionOptions, SshError, SshSession, PREFERRED_CIPHERS};
pub use spool::{SftpSpool, WRITE_BUFFER};
