//! The agent's configuration: `/etc/kiln/agent.toml`, with the same keys
//! from the kernel command line as `kiln.KEY=VALUE`, which win.
//!
//! ```toml
//! id = "rack3-node7"          # default: from the first NIC's MAC, else the DMI serial
//! poll_interval = "10s"
//! disk = "auto"               # or /dev/nvme0n1
//! debug = false               # on a fatal error: rescue shell instead of reboot
//! upload_window = "32MiB"     # compressed image in flight to the server (see below)
//! # keys whose signed images deploy jobs may write (`kiln-master signer`)
//! image_signers = ['kiln-master namespaces="kiln-image" ssh-ed25519 AAAA...']
//!
//! [[servers]]
//! address = "10.0.2.2:2222"
//! user = "kiln-agent"        # the default
//! key = "/etc/kiln/agent_key"
//! host_key = "ssh-ed25519 AAAA... host"
//! spool = "/srv/kiln/spool"
//! ```
//!
//! On the command line: `kiln.id=n7 kiln.disk=/dev/vda kiln.debug=1
//! kiln.server.0.address=10.0.2.2:2222 kiln.server.0.host_key="ssh-ed25519 AAAA..."`.
//! `kiln.server.N.*` changes server N, or adds it when N is the next index.
//!
//! `upload_window` (`kiln.upload_window=64MiB`) bounds the compressed image
//! between the capture and the job server: half of it for zstd's workers,
//! half for the upload's chunk buffers, which are kept until the server
//! holds them. The agent's memory is its fixed needs (under 96 MiB) plus
//! this window, whatever the payloads and the image; a larger window buys
//! zstd workers (up to the CPUs) and larger chunks.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::job::JobError;
use crate::units::Span;

/// Longest `poll_interval`: an hour.
pub const MAX_POLL_INTERVAL_SECS: u64 = 3600;
/// The default `upload_window`.
pub const DEFAULT_UPLOAD_WINDOW: u64 = 32 << 20;
/// The smallest and largest `upload_window`.
pub const MIN_UPLOAD_WINDOW: u64 = 4 << 20;
pub const MAX_UPLOAD_WINDOW: u64 = 4 << 30;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default = "default_poll")]
    pub poll_interval: Span,
    #[serde(default = "default_disk")]
    pub disk: String,
    #[serde(default)]
    pub debug: bool,
    /// Bytes of compressed image in flight between capture and server.
    #[serde(default = "default_window", with = "bytes")]
    pub upload_window: u64,
    #[serde(default)]
    pub servers: Vec<Server>,
    /// Keys whose image signatures this agent accepts for deploy jobs, as
    /// allowed-signers lines (`kiln-master signer` prints one). With none,
    /// the agent refuses every deploy job.
    ///
    /// ```toml
    /// image_signers = ['kiln-master namespaces="kiln-image" ssh-ed25519 AAAA...']
    /// ```
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_signers: Vec<String>,
}

fn default_window() -> u64 {
    DEFAULT_UPLOAD_WINDOW
}

/// A byte count written as `"32MiB"` (or a plain number), as sizes are
/// everywhere else in kiln.
mod bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::units::{format_bytes, Size};

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_bytes(*n))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Size::deserialize(d)? {
            Size::Bytes(n) => Ok(n),
            Size::Rest => Err(D::Error::custom(format!(
                "must be a size like \"32MiB\", not {:?}",
                "rest"
            ))),
        }
    }
}

fn default_poll() -> Span {
    Span::from_secs(10)
}
fn default_disk() -> String {
    "auto".into()
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// `host:port`.
    pub address: String,
    #[serde(default = "default_user")]
    pub user: String,
    /// Path to the agent's private key.
    pub key: PathBuf,
    /// The server's public host key, pinned: `ssh-ed25519 AAAA... [comment]`.
    pub host_key: String,
    /// The spool's path on the server (as the SFTP session sees it).
    pub spool: String,
}

/// The agents' account that `kiln-master init --agent-user` and
/// `agent-key` set up by default.
fn default_user() -> String {
    "kiln-agent".into()
}

// Credentials stay out of logs: Debug shows where the key is, never what.
impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("id", &self.id)
            .field("poll_interval", &self.poll_interval)
            .field("disk", &self.disk)
            .field("debug", &self.debug)
            .field("upload_window", &self.upload_window)
            .field("servers", &self.servers)
            .finish()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("address", &self.address)
            .field("user", &self.user)
            .field("key", &self.key)
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> JobError {
    JobError {
        file: None,
        field: field.into(),
        problem: problem.into(),
    }
}

/// Parses and validates `agent.toml` text.
pub fn parse_agent_config(text: &str) -> Result<AgentConfig, JobError> {
    let de = toml::Deserializer::new(text);
    let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        err(
            if field == "." { String::new() } else { field },
            e.into_inner().message().to_string(),
        )
    })?;
    cfg.validate()?;
    Ok(cfg)
}

/// Reads `agent.toml`; errors name the file.
pub fn load_agent_config(path: &Path) -> Result<AgentConfig, JobError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("", format!("cannot read: {e}")).in_file(path))?;
    parse_agent_config(&text).map_err(|e| e.in_file(path))
}

/// Splits a kernel command line into words, honouring double quotes.
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

impl AgentConfig {
    /// Applies `kiln.KEY=VALUE` words of a kernel command line; other words
    /// are ignored. The result is validated again.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<(), JobError> {
        for word in cmdline_words(cmdline) {
            let Some(rest) = word.strip_prefix("kiln.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, "1"));
            let field = format!("kiln.{key}");
            match key {
                "id" => self.id = Some(value.to_string()),
                "disk" => self.disk = value.to_string(),
                "debug" => self.debug = matches!(value, "1" | "true" | "yes" | "on"),
                "upload_window" => {
                    self.upload_window =
                        crate::units::parse_bytes(value).map_err(|p| err(&field, p))?;
                }
                "poll_interval" => {
                    self.poll_interval =
                        crate::units::parse_span(value).map_err(|p| err(&field, p))?;
                }
                k if k.starts_with("server.") => {
                    let mut parts = k.splitn(3, '.').skip(1);
                    let (Some(index), Some(name)) = (parts.next(), parts.next()) else {
                        return Err(err(field, "must be kiln.server.N.FIELD=VALUE"));
                    };
                    let index: usize = index
                        .parse()
                        .map_err(|_| err(&field, format!("{index:?} is not a server number")))?;
                    if index > self.servers.len() {
                        return Err(err(
                            field,
                            format!("server {index} skips server {}", self.servers.len()),
                        ));
                    }
                    if index == self.servers.len() {
                        self.servers.push(Server {
                            address: String::new(),
                            user: default_user(),
                            key: PathBuf::new(),
                            host_key: String::new(),
                            spool: String::new(),
                        });
                    }
                    let s = &mut self.servers[index];
                    match name {
                        "address" => s.address = value.to_string(),
                        "user" => s.user = value.to_string(),
                        "key" => s.key = PathBuf::from(value),
                        "host_key" => s.host_key = value.to_string(),
                        "spool" => s.spool = value.to_string(),
                        other => return Err(err(field, format!("unknown server field {other:?}"))),
                    }
                }
                other => return Err(err(field, format!("unknown key {other:?}"))),
            }
        }
        self.validate()
    }

    /// The agent waits this long between rounds of asking for work; a
    /// bound keeps its timers in range.
    fn validate(&self) -> Result<(), JobError> {
        let poll = self.poll_interval.as_secs();
        if !(1..=MAX_POLL_INTERVAL_SECS).contains(&poll) {
            return Err(err(
                "poll_interval",
                format!(
                    "{} is out of range 1s..=1h",
                    humantime::format_duration(self.poll_interval.0)
                ),
            ));
        }
        if !(MIN_UPLOAD_WINDOW..=MAX_UPLOAD_WINDOW).contains(&self.upload_window) {
            return Err(err(
                "upload_window",
                format!(
                    "{} is out of range {}..={}",
                    crate::units::format_bytes(self.upload_window),
                    crate::units::format_bytes(MIN_UPLOAD_WINDOW),
                    crate::units::format_bytes(MAX_UPLOAD_WINDOW)
                ),
            ));
        }
        for (i, line) in self.image_signers.iter().enumerate() {
            let field = format!("image_signers[{i}]");
            let signers = crate::signature::AllowedSigners::parse(line)
                .map_err(|e| err(&field, e.to_string()))?;
            if signers.is_empty() {
                return Err(err(
                    &field,
                    format!(
                        "holds no key for namespace {:?}: expected the line `kiln-master signer` prints",
                        crate::signature::NAMESPACE
                    ),
                ));
            }
        }
        if let Some(id) = &self.id {
            crate::names::check_job_id(id).map_err(|p| err("id", format!("agent id {p}")))?;
        }
        if self.disk != "auto" && !self.disk.starts_with('/') {
            return Err(err(
                "disk",
                format!("{:?} must be \"auto\" or an absolute path", self.disk),
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            let f = format!("servers[{i}]");
            let (host, port) = s.address.rsplit_once(':').unwrap_or(("", ""));
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(err(
                    format!("{f}.address"),
                    format!("{:?} must be host:port", s.address),
                ));
            }
            if s.user.is_empty() {
                return Err(err(format!("{f}.user"), "is empty"));
            }
            if s.key.as_os_str().is_empty() {
                return Err(err(format!("{f}.key"), "names no private key file"));
            }
            let mut words = s.host_key.split_whitespace();
            let (kind, blob) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-")) || blob.len() < 16 {
                return Err(err(
                    format!("{f}.host_key"),
                    "must be a public key line like \"ssh-ed25519 AAAA...\"",
                ));
            }
            if !s.spool.starts_with('/') {
                return Err(err(
                    format!("{f}.spool"),
                    format!("{:?} must be an absolute path", s.spool),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
poll_interval = "5s"
[[servers]]
address = "10.0.2.2:2222"
key = "/etc/kiln/agent_key"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG host"
spool = "/srv/kiln"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = parse_agent_config(TEXT).unwrap();
        assert_eq!(c.poll_interval.as_secs(), 5);
        assert_eq!(c.disk, "auto");
        assert_eq!(c.upload_window, 32 << 20);
        assert_eq!(c.servers[0].user, "kiln-agent");
        assert!(
            !format!("{c:?}").contains("AAAAC3"),
            "host keys and credentials stay out of Debug"
        );
    }

    #[test]
    fn command_line_wins() {
        let mut c = parse_agent_config(TEXT).unwrap();
        c.apply_cmdline(
            r#"console=ttyS0 kiln.id=n7 kiln.disk=/dev/vda kiln.debug kiln.server.0.address=10.0.2.2:2200 kiln.server.1.address=h:22 kiln.server.1.key=/k kiln.server.1.spool=/s kiln.server.1.host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG x""#,
        )
        .unwrap();
        assert_eq!(c.id.as_deref(), Some("n7"));
        assert_eq!(c.disk, "/dev/vda");
        assert!(c.debug);
        assert_eq!(c.servers[0].address, "10.0.2.2:2200");
        c.apply_cmdline("kiln.upload_window=64MiB").unwrap();
        assert_eq!(c.upload_window, 64 << 20);
        assert_eq!(
            c.servers[1].host_key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG x"
        );
    }

    #[test]
    fn image_signers_are_allowed_signers_lines_for_kiln_images() {
        let key = crate::signature::SigningKey::generate("m").unwrap();
        let line = key.allowed_signers_line("kiln-master");
        let c = parse_agent_config(&format!("image_signers = ['{line}']\n{TEXT}")).unwrap();
        assert_eq!(c.image_signers, [line]);
        for (bad, want) in [
            ("kiln-master ssh-ed25519 !!!", "not a public key"),
            (
                "kiln-master namespaces=\"git\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBf/f9GjeNFQUBPSbQA0tWJi2m4Wpm4kw1W45Ar1+OSl",
                "no key for namespace",
            ),
        ] {
            let e = parse_agent_config(&format!("image_signers = ['{bad}']\n{TEXT}")).unwrap_err();
            assert_eq!(e.field, "image_signers[0]", "{e}");
            assert!(e.problem.contains(want), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_agent_config(&TEXT.replace("10.0.2.2:2222", "nohost")).unwrap_err();
        assert_eq!(e.field, "servers[0].address");
        let e = parse_agent_config(&TEXT.replace("\"5s\"", "\"10000y\"")).unwrap_err();
        assert!(e.to_string().contains("poll_interval"), "{e}");
        let e = parse_agent_config(&TEXT.replace("poll_interval", "poll")).unwrap_err();
        assert!(e.problem.contains("unknown field"), "{e}");
        let mut c = parse_agent_config(TEXT).unwrap();
        let e = c.apply_cmdline("kiln.server.3.address=x:1").unwrap_err();
        assert_eq!(e.field, "kiln.server.3.address");
        let e = c.apply_cmdline("kiln.upload_window=1MiB").unwrap_err();
        assert_eq!(e.field, "upload_window");
        assert!(e.problem.contains("out of range"), "{e}");
        let mut c = parse_agent_config(TEXT).unwrap();
        let e = c.apply_cmdline("kiln.upload_window=lots").unwrap_err();
        assert_eq!(e.field, "kiln.upload_window");
        let e = parse_agent_config(&format!("upload_window = \"rest\"\n{TEXT}")).unwrap_err();
        assert_eq!(e.field, "upload_window");
        let c = parse_agent_config(&format!("upload_window = \"128MiB\"\n{TEXT}")).unwrap();
        assert_eq!(c.upload_window, 128 << 20);
        let mut c = parse_agent_config(TEXT).unwrap();
        let e = c.apply_cmdline("kiln.colour=red").unwrap_err();
        assert!(e.problem.contains("unknown key"), "{e}");
    }
}
