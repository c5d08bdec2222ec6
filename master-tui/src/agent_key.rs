//! `kiln-master agent-key --out DIR`: the ed25519 key pair agents log in
//! with, the `authorized_keys` file that accepts it, and the sshd drop-in
//! that confines the agents' account to SFTP inside the spool: chrooted
//! into the spool's parent, the in-process SFTP server forced, links and
//! attribute changes refused, no forwarding, no tty.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::unistd::Uid;

use crate::chroot::{check_config_word, ChrootLayout};
use crate::command;
use crate::init::check_account_name;

/// File name of the private key; the public key gets `.pub`.
pub const KEY_FILE: &str = "kiln-agent";
/// The file sshd reads the agents' key from (`AuthorizedKeysFile`).
pub const AUTHORIZED_KEYS: &str = "authorized_keys";
/// The sshd drop-in, for `/etc/ssh/sshd_config.d/`.
pub const DROP_IN: &str = "kiln-agents.conf";
pub const SSHD_CONFIG_D: &str = "/etc/ssh/sshd_config.d";
pub const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";
pub const SSHD: &str = "/usr/sbin/sshd";
/// The job server's host key that agents pin, when it has one.
pub const HOST_KEY_PUB: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
/// The agents' account unless `--agent-user` names another.
pub const AGENT_USER: &str = "kiln-agent";
/// Where the initramfs puts the private key, as `agent.toml` names it.
pub const KEY_IN_INITRAMFS: &str = "/etc/kiln/agent_key";
/// Where the README keeps the agents' key and its sshd files.
pub const EXAMPLE_OUT: &str = "/etc/kiln/agent-key";

/// `restrict` turns off every forwarding, the pty and ~/.ssh/rc; the forced
/// command makes any session the SFTP server, so shells and exec requests
/// get "This service allows sftp connections only." The drop-in says the
/// same again for the account, whatever key it presents.
pub const KEY_OPTIONS: &str = "restrict,command=\"internal-sftp\"";

/// internal-sftp requests (as `sftp-server -Q requests` spells them) that
/// agents never send and the server refuses: links, which could point the
/// master at files outside the spool, and attribute changes and
/// server-side copies, which agents have no use for.
pub const DENIED_REQUESTS: [&str; 6] = [
    "symlink",
    "hardlink",
    "setstat",
    "fsetstat",
    "lsetstat",
    "copy-data",
];

/// The umask internal-sftp applies to what agents create: files 0644,
/// directories 0755, so that the master can read every upload.
pub const AGENT_UMASK: &str = "0022";

/// The `authorized_keys` line for a public key line (`ssh-ed25519 AAAA... comment`).
pub fn authorized_keys_line(public_key: &str) -> String {
    format!("{KEY_OPTIONS} {}", public_key.trim())
}

/// The forced command: the in-process SFTP server, starting in the spool,
/// with its request filter and umask.
pub fn force_command(layout: &ChrootLayout) -> String {
    format!(
        "internal-sftp -d {} -P {} -u {AGENT_UMASK}",
        layout.spool_in_chroot,
        DENIED_REQUESTS.join(",")
    )
}

/// The sshd drop-in for `user`, whose key sshd reads from `keys_dir`.
pub fn drop_in(user: &str, keys_dir: &Path, layout: &ChrootLayout) -> String {
    format!(
        "# kiln's agents: SFTP only, chrooted into the spool's parent, no links,\n\
         # no forwarding. Made by `kiln-master agent-key`; install it in\n\
         # {SSHD_CONFIG_D}/ and check it with `sshd -t`.\n\
         Match User {user}\n\
         \x20   AuthorizedKeysFile {keys}/{AUTHORIZED_KEYS}\n\
         \x20   ChrootDirectory {chroot}\n\
         \x20   ForceCommand {force}\n\
         \x20   DisableForwarding yes\n\
         \x20   PermitTTY no\n\
         \x20   PermitTunnel no\n\
         \x20   PermitUserRC no\n",
        keys = keys_dir.display(),
        chroot = layout.chroot.display(),
        force = force_command(layout),
    )
}

/// The lines of a `[[servers]]` entry in `agent.toml` for this job server.
pub fn agent_toml(user: &str, layout: &ChrootLayout, host_key: Option<&str>) -> String {
    let host_key = match host_key {
        Some(line) => format!("host_key = {}\n", toml_string(line.trim())),
        None => format!(
            "# host_key = \"...\"   # {HOST_KEY_PUB} is missing: pin the server's \
             key (ssh-keyscan -t ed25519 HOST)\n"
        ),
    };
    format!(
        "user = {}\nkey = {}\nspool = {}\n{host_key}",
        toml_string(user),
        toml_string(KEY_IN_INITRAMFS),
        toml_string(&layout.spool_in_chroot),
    )
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// What `agent-key` was asked for.
#[derive(Debug, Clone)]
pub struct AgentKeyOptions {
    pub out: PathBuf,
    pub spool: PathBuf,
    pub agent_user: String,
}

/// The files `agent-key` writes.
#[derive(Debug, Clone)]
pub struct AgentKeyFiles {
    pub key: PathBuf,
    pub public: PathBuf,
    pub authorized_keys: PathBuf,
    pub drop_in: PathBuf,
}

impl AgentKeyFiles {
    pub fn in_dir(dir: &Path) -> Self {
        AgentKeyFiles {
            key: dir.join(KEY_FILE),
            public: dir.join(format!("{KEY_FILE}.pub")),
            authorized_keys: dir.join(AUTHORIZED_KEYS),
            drop_in: dir.join(DROP_IN),
        }
    }
}

/// Writes the key pair, `authorized_keys` and the drop-in, checks the
/// drop-in with sshd where it can, and prints what to install.
pub fn run(opts: &AgentKeyOptions, out: &mut dyn Write) -> Result<()> {
    check_account_name(&opts.agent_user).map_err(|p| anyhow::anyhow!("--agent-user {p}"))?;
    let layout = ChrootLayout::resolve(&opts.spool)?;
    // Nothing is made under a directory sshd would refuse.
    let wanted = std::path::absolute(&opts.out)
        .with_context(|| format!("making {} absolute", opts.out.display()))?;
    if let Some(existing) = wanted.ancestors().find(|p| p.exists()) {
        check_keys_dir(existing, &opts.agent_user)?;
    }
    let dir = make_out_dir(&wanted)?;
    check_keys_dir(&dir, &opts.agent_user)?;
    let files = write_files(&dir, &opts.agent_user, &layout)?;
    writeln!(
        out,
        "wrote {} (the private key: it goes into the initramfs as {KEY_IN_INITRAMFS})",
        files.key.display()
    )?;
    for f in [&files.public, &files.authorized_keys, &files.drop_in] {
        writeln!(out, "wrote {}", f.display())?;
    }
    match check_with_sshd(&files.drop_in, &opts.agent_user, &layout)? {
        Some(checked) => writeln!(out, "{checked}")?,
        None => writeln!(
            out,
            "not checked: run `sshd -t` as root on the job server once the drop-in is installed"
        )?,
    }
    writeln!(
        out,
        "\nInstall the drop-in on the job server and restart sshd:\n\
         \x20 install -m 0644 {} {SSHD_CONFIG_D}/{DROP_IN}\n\
         \x20 sshd -t && systemctl restart ssh\n\
         {SSHD_CONFIG} must include {SSHD_CONFIG_D}/*.conf (Debian's does) and no\n\
         AllowUsers or AllowGroups line may shut out {}.",
        files.drop_in.display(),
        opts.agent_user
    )?;
    let host_key = fs::read_to_string(HOST_KEY_PUB).ok();
    writeln!(
        out,
        "\nagent.toml, in this job server's [[servers]] entry:\n{}",
        agent_toml(&opts.agent_user, &layout, host_key.as_deref())
    )?;
    Ok(())
}

/// Makes the key directory if missing (mode 0755, so that sshd, reading
/// `authorized_keys` as the agents' account, can reach it) and returns it
/// absolute.
fn make_out_dir(out: &Path) -> Result<PathBuf> {
    if !out.exists() {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        fs::set_permissions(out, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", out.display()))?;
    }
    let dir = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let text = dir.to_string_lossy();
    check_config_word(&text).map_err(|p| anyhow::anyhow!("--out {text}: {p}"))?;
    Ok(dir)
}

/// sshd reads `authorized_keys` as the agents' account and, with
/// StrictModes (its default), only from a path that root owns and nobody
/// else can write, from the file up to `/`.
fn check_keys_dir(dir: &Path, user: &str) -> Result<()> {
    let mut parts: Vec<&Path> = dir.ancestors().collect();
    parts.reverse();
    for p in parts {
        let m = fs::metadata(p).with_context(|| format!("checking {}", p.display()))?;
        let problem = if m.uid() != 0 {
            Some(format!("is owned by uid {}, not root", m.uid()))
        } else if m.mode() & 0o022 != 0 {
            Some(format!("has mode {:04o}", m.mode() & 0o7777))
        } else if m.mode() & 0o001 == 0 {
            Some(format!(
                "has mode {:04o}: {user} cannot reach the key",
                m.mode() & 0o7777
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            bail!(
                "{} {problem}. sshd reads {AUTHORIZED_KEYS} there as {user}, and only \
                 from directories that root owns, nobody else can write and others \
                 can search: run agent-key as root with --out in such a directory, \
                 e.g. {EXAMPLE_OUT}",
                p.display()
            );
        }
    }
    Ok(())
}

/// Makes the key pair in `dir` with `authorized_keys` and the drop-in
/// beside it. Refuses to replace an existing key.
pub fn write_files(dir: &Path, user: &str, layout: &ChrootLayout) -> Result<AgentKeyFiles> {
    let files = AgentKeyFiles::in_dir(dir);
    for p in [&files.key, &files.public] {
        if fs::symlink_metadata(p).is_ok() {
            bail!(
                "{} exists: agent-key never replaces a key that initramfs images may \
                 carry; remove it or pick another --out",
                p.display()
            );
        }
    }
    command::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", KEY_FILE, "-f"])
            .arg(&files.key),
        "install openssh-client",
    )?;
    let public = fs::read_to_string(&files.public)
        .with_context(|| format!("reading {}", files.public.display()))?;
    write_public(
        &files.authorized_keys,
        &format!("{}\n", authorized_keys_line(&public)),
    )?;
    write_public(&files.drop_in, &drop_in(user, dir, layout))?;
    Ok(files)
}

/// Writes a file that sshd and anyone may read: mode 0644 whatever the umask.
fn write_public(path: &Path, text: &str) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(0o644)))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs `sshd -t` on the server's config with the drop-in included first,
/// then `sshd -T` for the agents' account to see that the drop-in's
/// settings are the ones that apply. `None` when sshd is not installed or
/// this is not root (sshd reads the host keys).
fn check_with_sshd(drop_in: &Path, user: &str, layout: &ChrootLayout) -> Result<Option<String>> {
    if !Path::new(SSHD).exists() || !Path::new(SSHD_CONFIG).exists() || !Uid::effective().is_root()
    {
        return Ok(None);
    }
    // sshd -t wants its privilege separation directory, as the service has.
    fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
    let config = drop_in.with_file_name(format!(".{DROP_IN}.check"));
    fs::write(
        &config,
        format!("Include {}\nInclude {SSHD_CONFIG}\n", drop_in.display()),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let result = (|| {
        command::run(
            Command::new(SSHD).arg("-t").arg("-f").arg(&config),
            "install openssh-server",
        )?;
        let effective = command::run(
            Command::new(SSHD)
                .arg("-T")
                .arg("-C")
                .arg(format!("user={user},host=kiln-agent,addr=127.0.0.1"))
                .arg("-f")
                .arg(&config),
            "install openssh-server",
        )?;
        check_effective(&effective, layout)
    })();
    let _ = fs::remove_file(&config);
    result?;
    Ok(Some(format!(
        "sshd -t accepts {SSHD_CONFIG} with the drop-in; for {user} it chroots into {} \
         and forces `{}`",
        layout.chroot.display(),
        force_command(layout)
    )))
}

/// Checks `sshd -T`'s output for the agents' account against the drop-in.
fn check_effective(effective: &str, layout: &ChrootLayout) -> Result<()> {
    let wanted = [
        format!("chrootdirectory {}", layout.chroot.display()),
        format!("forcecommand {}", force_command(layout)),
        "disableforwarding yes".to_string(),
        "permittty no".to_string(),
    ];
    for w in &wanted {
        if !effective.lines().any(|l| l.trim() == w) {
            bail!(
                "sshd -T for the agents' account lacks `{w}`: another Match block or \
                 setting in {SSHD_CONFIG} wins over the drop-in"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ChrootLayout {
        ChrootLayout::new(Path::new("/srv/kiln/spool")).unwrap()
    }

    #[test]
    fn makes_a_key_with_its_files_and_refuses_to_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_files(dir.path(), AGENT_USER, &layout()).unwrap();
        let public = fs::read_to_string(&files.public).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        let keys = fs::read_to_string(&files.authorized_keys).unwrap();
        assert_eq!(keys, format!("{}\n", authorized_keys_line(&public)));
        assert!(keys.starts_with("restrict,command=\"internal-sftp\" ssh-ed25519 "));
        assert_eq!(keys.lines().count(), 1);
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(mode(&files.authorized_keys), 0o644);
        assert_eq!(mode(&files.drop_in), 0o644);
        let conf = fs::read_to_string(&files.drop_in).unwrap();
        assert!(
            conf.contains(&format!(
                "    AuthorizedKeysFile {}/authorized_keys\n",
                dir.path().display()
            )),
            "{conf}"
        );
        let e = write_files(dir.path(), AGENT_USER, &layout()).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
    }

    #[test]
    fn the_drop_in_confines_the_account() {
        let conf = drop_in("kiln-agent", Path::new("/etc/kiln/agent-key"), &layout());
        let body: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "Match User kiln-agent",
                "    AuthorizedKeysFile /etc/kiln/agent-key/authorized_keys",
                "    ChrootDirectory /srv/kiln",
                "    ForceCommand internal-sftp -d /spool -P symlink,hardlink,setstat,fsetstat,lsetstat,copy-data -u 0022",
                "    DisableForwarding yes",
                "    PermitTTY no",
                "    PermitTunnel no",
                "    PermitUserRC no",
            ]
        );
    }

    #[test]
    fn the_denied_requests_are_ones_sftp_server_knows_and_spare_what_agents_use() {
        let known = Command::new("/usr/lib/openssh/sftp-server")
            .args(["-Q", "requests"])
            .output()
            .expect("/usr/lib/openssh/sftp-server runs (scripts/install-deps.sh installs openssh-server)");
        let known = String::from_utf8_lossy(&known.stdout);
        for r in DENIED_REQUESTS {
            assert!(known.lines().any(|l| l == r), "sftp-server knows no {r:?}");
        }
        // Writes replace status files with posix-rename and create leases
        // with a plain rename (link(2) inside sftp-server).
        for needed in [
            "rename",
            "posix-rename",
            "remove",
            "mkdir",
            "rmdir",
            "fsync",
        ] {
            assert!(!DENIED_REQUESTS.contains(&needed), "{needed}");
        }
    }

    #[test]
    fn agent_toml_names_the_spool_inside_the_chroot() {
        let t = agent_toml(
            "kiln-agent",
            &layout(),
            Some("ssh-ed25519 AAAA root@jobs1\n"),
        );
        assert_eq!(
            t,
            "user = \"kiln-agent\"\nkey = \"/etc/kiln/agent_key\"\nspool = \"/spool\"\n\
             host_key = \"ssh-ed25519 AAAA root@jobs1\"\n"
        );
        assert!(agent_toml("kiln-agent", &layout(), None).contains("# host_key"));
    }

    #[test]
    fn a_keys_dir_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_keys_dir(dir.path(), AGENT_USER)
            .unwrap_err()
            .to_string();
        // /tmp is 1777, or the temporary directory is not root's.
        assert!(e.contains(EXAMPLE_OUT), "{e}");
    }

    #[test]
    fn sshd_applies_the_drop_in_to_the_account() {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing (scripts/install-deps.sh installs openssh-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let host_key = dir.path().join("host_key");
        command::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key),
            "install openssh-client",
        )
        .unwrap();
        let drop = dir.path().join(DROP_IN);
        fs::write(&drop, drop_in("kiln-agent", dir.path(), &layout())).unwrap();
        let config = dir.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "Include {}\nHostKey {}\nSubsystem sftp internal-sftp\n",
                drop.display(),
                host_key.display()
            ),
        )
        .unwrap();
        let _ = fs::create_dir_all("/run/sshd");
        command::run(
            Command::new(SSHD).arg("-t").arg("-f").arg(&config),
            "openssh-server",
        )
        .unwrap();
        let effective = command::run(
            Command::new(SSHD)
                .args([
                    "-T",
                    "-C",
                    "user=kiln-agent,host=agent,addr=10.0.2.15",
                    "-f",
                ])
                .arg(&config),
            "openssh-server",
        )
        .unwrap();
        check_effective(&effective, &layout()).unwrap();
        // The block ends with its file: another account gets none of it.
        let other = command::run(
            Command::new(SSHD)
                .args(["-T", "-C", "user=root,host=agent,addr=10.0.2.15", "-f"])
                .arg(&config),
            "openssh-server",
        )
        .unwrap();
        assert!(check_effective(&other, &layout()).is_err(), "{other}");
    }
}
