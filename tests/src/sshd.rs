//! A test sshd on 127.0.0.1: OpenSSH's own `/usr/sbin/sshd`, with a host key,
//! a client key and a config generated into a temporary directory. The guard
//! kills the daemon and every connection it forked when it drops.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SSH_KEYGEN: &str = "ssh-keygen";

/// What to put around the client key and into sshd_config.
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Options before the client key in `authorized_keys`
    /// (`restrict,command="internal-sftp"`); empty for none.
    pub key_options: String,
    /// Appended to sshd_config, after everything else (Match blocks go here).
    /// `{user}` is replaced by the test user.
    pub extra_config: String,
    /// Drop-ins included at the top of sshd_config, as Debian's includes
    /// `/etc/ssh/sshd_config.d/*.conf`.
    pub include: Vec<PathBuf>,
    /// Accounts allowed in besides the current user.
    pub users: Vec<String>,
    /// sshd's own default: key files and the directories above them must be
    /// root's (or the account's) and writable by nobody else. Off by default
    /// because the client key lives in a temporary directory.
    pub strict_modes: bool,
}

/// A running sshd; killed, with all its connections, on drop.
pub struct TestSshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    user: String,
    host_key_line: String,
}

/// Fails the test, naming what to install, when sshd or ssh-keygen is
/// missing: a test that cannot run its tools fails rather than passes.
pub fn require_sshd() {
    let have_keygen = Command::new(SSH_KEYGEN)
        .arg("-?")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        Path::new(SSHD).exists() && have_keygen,
        "{SSHD} or {SSH_KEYGEN} is missing: scripts/install-deps.sh installs openssh-server"
    );
}

/// For callers written as `if skip_without_sshd() { return; }`: fails the
/// test when sshd is missing ([`require_sshd`]), never skips it.
pub fn skip_without_sshd() -> bool {
    require_sshd();
    false
}

/// Runs ssh-keygen for a new ed25519 key without a passphrase at `path`.
pub fn keygen(path: &Path, comment: &str) -> Result<()> {
    let out = Command::new(SSH_KEYGEN)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {SSH_KEYGEN} for {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{SSH_KEYGEN} for {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn current_user() -> Result<String> {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .context("looking up the current user")?
        .with_context(|| format!("uid {uid} has no passwd entry"))?;
    Ok(user.name)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The config lines that differ between test sshds.
struct Settings {
    extra: String,
    include: Vec<PathBuf>,
    users: Vec<String>,
    strict_modes: bool,
}

impl TestSshd {
    /// An sshd that accepts the client key for the current user, unrestricted.
    pub fn start() -> Result<Self> {
        Self::start_with(SshdOptions::default())
    }

    pub fn start_with(opts: SshdOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-sshd.")
            .tempdir()
            .context("creating the sshd directory")?;
        let d = dir.path();
        keygen(&d.join("host_key"), "kiln-test-host")?;
        keygen(&d.join("client_key"), "kiln-test-client")?;
        let user = current_user()?;
        let client_pub = fs::read_to_string(d.join("client_key.pub"))?;
        let line = if opts.key_options.is_empty() {
            client_pub.trim().to_string()
        } else {
            format!("{} {}", opts.key_options, client_pub.trim())
        };
        fs::write(d.join("authorized_keys"), format!("{line}\n"))?;
        let host_key_line = fs::read_to_string(d.join("host_key.pub"))?
            .trim()
            .to_string();
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;

        let settings = Settings {
            extra: opts.extra_config.replace("{user}", &user),
            include: opts.include.clone(),
            users: std::iter::once(user.clone())
                .chain(opts.users.iter().cloned())
                .collect(),
            strict_modes: opts.strict_modes,
        };
        let mut sshd = TestSshd {
            dir,
            port: 0,
            child: None,
            user,
            host_key_line,
        };
        // Another process may take the free port between our probe and
        // sshd's bind; try a few.
        let mut last = None;
        for _ in 0..5 {
            sshd.port = free_port()?;
            sshd.write_config(&settings)?;
            match sshd.spawn() {
                Ok(()) => return Ok(sshd),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn write_config(&self, settings: &Settings) -> Result<()> {
        let d = self.dir.path().display();
        let include: String = settings
            .include
            .iter()
            .map(|p| format!("Include {}\n", p.display()))
            .collect();
        let config = format!(
            "{include}\
             # kiln test sshd\n\
             ListenAddress 127.0.0.1:{port}\n\
             HostKey {d}/host_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             AllowUsers {users}\n\
             StrictModes {strict}\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n\
             {extra}\n",
            port = self.port,
            users = settings.users.join(" "),
            strict = if settings.strict_modes { "yes" } else { "no" },
            extra = settings.extra,
        );
        let path = self.config_path();
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// sshd's config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the sshd log")?;
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {SSHD}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect_timeout(
                &(Ipv4Addr::LOCALHOST, self.port).into(),
                Duration::from_millis(500),
            )
            .is_ok()
            {
                return Ok(());
            }
            let child = self.child.as_mut().expect("spawned above");
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "sshd exited with {status} before listening on port {}:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "sshd did not listen on port {} within 15 s:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills sshd and every session it forked: a dead link, as the client sees it.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Connection processes call setsid(), so a process group does not
        // reach them: find them through their parents.
        // A stopped process still dies of SIGKILL.
        let root = child.id() as i32;
        let mut victims = descendants(root);
        victims.push(root);
        for pid in &victims {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let _ = child.wait();
        // Wait until the killed sessions are gone, so a restart finds the port free
        // and no old session writes into the spool behind the test's back.
        let deadline = Instant::now() + Duration::from_secs(5);
        while victims.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) sshd and its sessions: a link
    /// that stays up but carries nothing.
    pub fn freeze(&self, frozen: bool) {
        let Some(child) = &self.child else {
            return;
        };
        let root = child.id() as i32;
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let mut pids = descendants(root);
        pids.push(root);
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// Kills sshd with its sessions and starts it again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The private key that `authorized_keys` accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// The host key's public line (`ssh-ed25519 AAAA... comment`), for pinning.
    pub fn host_key_line(&self) -> &str {
        &self.host_key_line
    }

    /// The temporary directory holding keys, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of sshd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(stat_fields(&s), Some((_, 'Z'))),
        Err(_) => false,
    }
}

/// (ppid, state) from a /proc/PID/stat line; the command name may hold spaces.
fn stat_fields(stat: &str) -> Option<(i32, char)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Every process below `root` in the process tree.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_fields(&s))
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}
