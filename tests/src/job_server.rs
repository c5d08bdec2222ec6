//! A job server set up as the README sets one up: `kiln-master init
//! --agent-user kiln-agent` and `kiln-master agent-key` run for real, and
//! the test sshd includes the drop-in agent-key wrote, as Debian's
//! sshd_config includes `/etc/ssh/sshd_config.d/*.conf`. Agents log in as
//! `kiln-agent` with agent-key's key, chrooted into the spool's parent.
//!
//! The spool lives under [`BASE`], outside /tmp: sshd wants the chroot and
//! every directory above it root's and writable by nobody else, and reads
//! `authorized_keys` only from such a path (StrictModes, on here as it is
//! by default).

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use kiln_spool::agent_config::Server;

use crate::binaries::kiln_master;
use crate::sshd::{require_sshd, SshdOptions, TestSshd};

/// The agents' account; `kiln-master init` creates it, and it stays.
pub const AGENT_USER: &str = "kiln-agent";
/// Where job servers' chroots and key directories are made.
pub const BASE: &str = "/run/kiln-e2e";
/// The spool's name in its chroot.
pub const SPOOL_NAME: &str = "spool";

/// A running job server; on drop, sshd and its sessions are killed, then
/// the spool, its chroot and the keys are removed.
pub struct JobServer {
    // Fields drop in order: sshd and its sessions before their directories.
    sshd: TestSshd,
    chroot: tempfile::TempDir,
    keys: tempfile::TempDir,
    spool: PathBuf,
    init_output: String,
    agent_key_output: String,
}

impl JobServer {
    /// Makes a spool with `kiln-master init --agent-user`, the key and the
    /// drop-in with `kiln-master agent-key`, and starts sshd with it.
    pub fn start() -> Result<Self> {
        require_sshd();
        let base = base_dir()?;
        let chroot = private_dir(&base, "server.")?;
        let keys = private_dir(&base, "keys.")?;
        let spool = chroot.path().join(SPOOL_NAME);
        let init_output = {
            // useradd and usermod lock /etc/passwd: one init at a time,
            // across test processes too.
            let _accounts = lock_file(&base.join(".accounts.lock"))?;
            run_master(&spool, &["init", "--agent-user", AGENT_USER])?
        };
        let agent_key_output = run_master(
            &spool,
            &[
                "agent-key",
                "--out",
                &keys.path().display().to_string(),
                "--agent-user",
                AGENT_USER,
            ],
        )?;
        let sshd = TestSshd::start_with(SshdOptions {
            include: vec![keys.path().join("kiln-agents.conf")],
            users: vec![AGENT_USER.to_string()],
            strict_modes: true,
            ..SshdOptions::default()
        })?;
        Ok(JobServer {
            sshd,
            chroot,
            keys,
            spool,
            init_output,
            agent_key_output,
        })
    }

    /// The spool on this host.
    pub fn spool(&self) -> &Path {
        &self.spool
    }

    /// The spool as agents name it, inside their chroot.
    pub fn agent_spool(&self) -> String {
        format!("/{SPOOL_NAME}")
    }

    /// sshd's `ChrootDirectory`: the spool's parent.
    pub fn chroot(&self) -> &Path {
        self.chroot.path()
    }

    /// The agents' private key, as agent-key made it.
    pub fn agent_key(&self) -> PathBuf {
        self.keys.path().join("kiln-agent")
    }

    /// The drop-in agent-key wrote, which sshd includes.
    pub fn drop_in(&self) -> PathBuf {
        self.keys.path().join("kiln-agents.conf")
    }

    /// How an agent on this host reaches the job server.
    pub fn agent_server(&self) -> Server {
        self.agent_server_at(&self.sshd.address())
    }

    /// How an agent reaches the job server at `address` (`10.0.2.2:PORT`
    /// from a QEMU guest).
    pub fn agent_server_at(&self, address: &str) -> Server {
        Server {
            address: address.to_string(),
            user: AGENT_USER.to_string(),
            key: self.agent_key(),
            host_key: self.sshd.host_key_line().to_string(),
            spool: self.agent_spool(),
        }
    }

    pub fn sshd(&self) -> &TestSshd {
        &self.sshd
    }

    pub fn sshd_mut(&mut self) -> &mut TestSshd {
        &mut self.sshd
    }

    /// What `kiln-master init --agent-user` printed.
    pub fn init_output(&self) -> &str {
        &self.init_output
    }

    /// What `kiln-master agent-key` printed.
    pub fn agent_key_output(&self) -> &str {
        &self.agent_key_output
    }

    /// Runs `kiln-master --spool SPOOL ARGS` and returns its output,
    /// whatever its exit status.
    pub fn master_output(&self, args: &[&str]) -> Result<Output> {
        master_command(&self.spool, args)?
            .output()
            .context("running kiln-master")
    }

    /// Runs `kiln-master --spool SPOOL ARGS`; fails unless it succeeds.
    pub fn master(&self, args: &[&str]) -> Result<String> {
        run_master(&self.spool, args)
    }
}

/// `kiln-master --spool SPOOL ARGS`, ready to run.
pub fn master_command(spool: &Path, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(kiln_master()?);
    cmd.arg("--spool")
        .arg(spool)
        .args(args)
        .stdin(Stdio::null());
    Ok(cmd)
}

fn run_master(spool: &Path, args: &[&str]) -> Result<String> {
    let out = master_command(spool, args)?
        .output()
        .context("running kiln-master")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "kiln-master {} failed ({}): {stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// [`BASE`], root's and mode 0755 like every directory above a chroot.
fn base_dir() -> Result<PathBuf> {
    let base = PathBuf::from(BASE);
    fs::create_dir_all(&base).with_context(|| format!("creating {BASE}"))?;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {BASE}"))?;
    Ok(base)
}

/// A new directory in `base`, mode 0755: sshd's rules for a chroot and for
/// the directory holding `authorized_keys`.
fn private_dir(base: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .with_context(|| format!("creating a directory in {}", base.display()))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.path().display()))?;
    Ok(dir)
}

/// An exclusive lock on `path`, released when the file closes.
fn lock_file(path: &Path) -> Result<File> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}
