//! An SSH session to a job server: TCP connect with a timeout, the server's
//! host key checked against the pinned one, public key authentication, and
//! timeouts plus keepalives on everything after.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ssh2::{MethodType, Session};

use super::host_key::{blob_algorithm, fingerprint, HostKey};

/// Ciphers in the order the agent asks for them. libssh2's AES-GCM runs on
/// OpenSSL and is many times faster than its own chacha20-poly1305.
pub const PREFERRED_CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr,chacha20-poly1305@openssh.com";

/// One job server, as an agent's config names it (`[[servers]]` in `agent.toml`).
pub use crate::agent_config::Server as ServerConfig;

/// Timeouts and keepalives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// For the TCP connect and the SSH handshake and authentication.
    pub connect_timeout: Duration,
    /// For every later wait on the server: a link that stays silent this long is dead.
    pub io_timeout: Duration,
    /// How often a keepalive goes out on an otherwise idle session.
    pub keepalive: Duration,
    /// Cipher preference, most wanted first (`PREFERRED_CIPHERS`).
    pub ciphers: String,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            connect_timeout: Duration::from_secs(15),
            io_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(15),
            ciphers: PREFERRED_CIPHERS.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("resolving {address}")]
    Resolve {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {address}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}")]
    Ssh {
        what: String,
        #[source]
        source: ssh2::Error,
    },
    #[error("the pinned host key for {address} is unusable: {problem}")]
    PinnedKey { address: String, problem: String },
    #[error(
        "refusing {address}: its host key is {server} ({server_type}), \
         the pinned host key is {pinned} ({pinned_type})"
    )]
    HostKeyMismatch {
        address: String,
        server: String,
        server_type: String,
        pinned: String,
        pinned_type: String,
    },
    #[error("authenticating as {user} at {address} with the key {}", key.display())]
    Auth {
        user: String,
        address: String,
        key: PathBuf,
        #[source]
        source: ssh2::Error,
    },
}

fn ssh(what: impl Into<String>) -> impl FnOnce(ssh2::Error) -> SshError {
    let what = what.into();
    move |source| SshError::Ssh { what, source }
}

/// An authenticated SSH session; disconnects on drop.
pub struct SshSession {
    session: Session,
    address: String,
}

impl SshSession {
    /// Connects, checks the host key against `server.host_key` and
    /// authenticates with `server.key`.
    pub fn connect(server: &ServerConfig, opts: &SessionOptions) -> Result<Self, SshError> {
        let address = server.address.clone();
        let pinned = HostKey::parse(&server.host_key).map_err(|problem| SshError::PinnedKey {
            address: address.clone(),
            problem,
        })?;
        let tcp = connect_tcp(&address, opts.connect_timeout)?;

        let mut session = Session::new().map_err(ssh("starting an ssh session"))?;
        session.set_tcp_stream(tcp);
        session.set_timeout(millis(opts.connect_timeout));
        for dir in [MethodType::CryptCs, MethodType::CryptSc] {
            session
                .method_pref(dir, &opts.ciphers)
                .map_err(ssh(format!("setting the ciphers {:?}", opts.ciphers)))?;
        }
        // Ask for the pinned key's type first, so that a server with several
        // host keys shows the one that was pinned.
        let mut host_key_prefs = vec![pinned.algorithm.clone()];
        if let Ok(algs) = session.supported_algs(MethodType::HostKey) {
            host_key_prefs.extend(
                algs.into_iter()
                    .filter(|a| *a != pinned.algorithm)
                    .map(str::to_string),
            );
        }
        session
            .method_pref(MethodType::HostKey, &host_key_prefs.join(","))
            .map_err(ssh(format!("asking for a {} host key", pinned.algorithm)))?;
        session
            .handshake()
            .map_err(ssh(format!("ssh handshake with {address}")))?;

        let (blob, _) = session.host_key().ok_or_else(|| SshError::PinnedKey {
            address: address.clone(),
            problem: "the server sent no host key".into(),
        })?;
        if blob != pinned.blob.as_slice() {
            let err = SshError::HostKeyMismatch {
                address: address.clone(),
                server: fingerprint(blob),
                server_type: blob_algorithm(blob),
                pinned: pinned.fingerprint(),
                pinned_type: pinned.algorithm.clone(),
            };
            let _ = session.disconnect(
                Some(ssh2::DisconnectCode::HostKeyNotVerifiable),
                "host key mismatch",
                None,
            );
            return Err(err);
        }

        session
            .userauth_pubkey_file(&server.user, None, &server.key, None)
            .map_err(|source| SshError::Auth {
                user: server.user.clone(),
                address: address.clone(),
                key: server.key.clone(),
                source,
            })?;
        session.set_timeout(millis(opts.io_timeout));
        session.set_keepalive(true, opts.keepalive.as_secs().max(2) as u32);
        tracing::debug!(
            address,
            cipher = session.methods(MethodType::CryptCs).unwrap_or("?"),
            "ssh session up"
        );
        Ok(SshSession { session, address })
    }

    /// The libssh2 session, for channels beside SFTP.
    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The cipher negotiated for the agent's direction.
    pub fn cipher(&self) -> Option<String> {
        self.session
            .methods(MethodType::CryptCs)
            .map(str::to_string)
    }

    /// Sends a keepalive if the session has been idle for the interval.
    pub fn keepalive(&self) -> io::Result<()> {
        self.session
            .keepalive_send()
            .map(|_| ())
            .map_err(Into::into)
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        // Short: a dead link must not hold up the drop for the full timeout.
        self.session.set_timeout(2000);
        if let Err(e) =
            self.session
                .disconnect(Some(ssh2::DisconnectCode::ByApplication), "bye", None)
        {
            tracing::debug!(address = self.address, "ssh disconnect: {e}");
        }
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

fn connect_tcp(address: &str, timeout: Duration) -> Result<TcpStream, SshError> {
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|source| SshError::Resolve {
            address: address.to_string(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(SshError::Connect {
        address: address.to_string(),
        source: last,
    })
}
