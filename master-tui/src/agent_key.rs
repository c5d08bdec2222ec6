//! `kiln-master agent-key [--out DIR]`: makes the ed25519 key pair agents
//! log in with, and prints what the job server's sshd needs so that the key
//! can do SFTP inside the spool and nothing else.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// File name of the private key; the public key gets `.pub`.
pub const KEY_FILE: &str = "kiln-agent";
/// The account agents log in as, in the printed `Match User` block.
pub const ACCOUNT: &str = "kiln";
/// The chroot in the printed block: owned by root, not writable by others.
pub const CHROOT: &str = "/srv/kiln";
/// The spool inside the chroot, owned by the account; agents name it as
/// `spool = "/spool"`.
pub const SPOOL_IN_CHROOT: &str = "/spool";

/// `restrict` turns off every forwarding, the pty and ~/.ssh/rc; the forced
/// command makes any session the SFTP server, so shells and exec requests
/// get "This service allows sftp connections only."
pub const KEY_OPTIONS: &str = "restrict,command=\"internal-sftp\"";

/// The `authorized_keys` line for a public key line (`ssh-ed25519 AAAA... comment`).
pub fn authorized_keys_line(public_key: &str) -> String {
    format!("{KEY_OPTIONS} {}", public_key.trim())
}

/// The `sshd_config` block that confines `user` to `chroot` with the
/// in-process SFTP server starting in `spool` (a path inside the chroot).
/// sshd needs `chroot` and every directory above it owned by root and
/// writable by nobody else.
pub fn sshd_match_block(user: &str, chroot: &Path, spool: &str) -> String {
    format!(
        "Match User {user}\n\
         \x20   ChrootDirectory {chroot}\n\
         \x20   ForceCommand internal-sftp -d {spool}\n\
         \x20   DisableForwarding yes\n\
         \x20   PermitTTY no\n\
         \x20   PermitTunnel no\n\
         \x20   PermitUserRC no\n",
        chroot = chroot.display(),
    )
}

/// Makes the key pair in `out` (the current directory if `None`) and prints
/// the lines to install. Refuses to replace an existing key.
pub fn run(out: Option<&Path>) -> Result<()> {
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = dir.join(KEY_FILE);
    let public = dir.join(format!("{KEY_FILE}.pub"));
    for p in [&key, &public] {
        if p.exists() {
            bail!("{} exists; remove it or pick another --out", p.display());
        }
    }
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-agent", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    if !output.status.success() {
        bail!(
            "ssh-keygen -t ed25519 -f {} failed: {}",
            key.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let public_line = std::fs::read_to_string(&public)
        .with_context(|| format!("reading {}", public.display()))?;

    println!(
        "# Private key for the agents (agent.toml: key = ...): {}",
        key.display()
    );
    println!("# Public key: {}", public.display());
    println!();
    println!("# On the job server, in ~{ACCOUNT}/.ssh/authorized_keys (one line):");
    println!("{}", authorized_keys_line(&public_line));
    println!();
    println!(
        "# At the end of /etc/ssh/sshd_config. {CHROOT} and the directories above it\n\
         # must be owned by root and writable by nobody else; the spool\n\
         # {CHROOT}{SPOOL_IN_CHROOT} belongs to {ACCOUNT}. Agents use spool = \"{SPOOL_IN_CHROOT}\"."
    );
    print!(
        "{}",
        sshd_match_block(ACCOUNT, Path::new(CHROOT), SPOOL_IN_CHROOT)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_key_and_refuses_to_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        run(Some(dir.path())).unwrap();
        let public = std::fs::read_to_string(dir.path().join("kiln-agent.pub")).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        let line = authorized_keys_line(&public);
        assert!(line.starts_with("restrict,command=\"internal-sftp\" ssh-ed25519 "));
        assert!(!line.contains('\n'));
        let e = run(Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
    }

    #[test]
    fn sshd_accepts_the_match_block() {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            eprintln!("SKIP: /usr/sbin/sshd is missing (install openssh-server)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host_key = dir.path().join("host_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .status()
            .unwrap();
        assert!(st.success());
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "HostKey {}\nSubsystem sftp internal-sftp\n{}",
                host_key.display(),
                sshd_match_block(ACCOUNT, Path::new(CHROOT), SPOOL_IN_CHROOT)
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        // -t checks the config; -C evaluates the Match block for the account.
        let out = Command::new(sshd)
            .arg("-t")
            .arg("-f")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(sshd)
            .args(["-T", "-C", "user=kiln,host=agent,addr=10.0.2.15", "-f"])
            .arg(&config)
            .output()
            .unwrap();
        let effective = String::from_utf8_lossy(&out.stdout);
        assert!(
            effective.contains("chrootdirectory /srv/kiln"),
            "{effective}"
        );
        assert!(
            effective.contains("forcecommand internal-sftp -d /spool"),
            "{effective}"
        );
        assert!(effective.contains("disableforwarding yes"), "{effective}");
    }
}
