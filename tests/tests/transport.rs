//! The agent's transport against OpenSSH's sshd on 127.0.0.1: the spool over
//! SFTP, pinned host keys, claims racing across sessions, the restricted key,
//! and resumable, verified uploads that the master publishes.

use std::io::{self, Read, Write};
use std::path::Path;

use kiln_e2e::sshd::{skip_without_sshd, TestSshd};
use kiln_protocol::sftp::{ServerConfig, SessionOptions, SftpSpool};
use kiln_protocol::spool::DIRS;
use kiln_protocol::{LocalSpool, SpoolFs};

fn server(sshd: &TestSshd, spool: &Path) -> ServerConfig {
    ServerConfig {
        address: sshd.address(),
        user: sshd.user().to_string(),
        key: sshd.client_key(),
        host_key: sshd.host_key_line().to_string(),
        spool: spool.display().to_string(),
    }
}

fn connect(sshd: &TestSshd, spool: &Path) -> SftpSpool {
    SftpSpool::connect(&server(sshd, spool), &SessionOptions::default())
        .unwrap_or_else(|e| panic!("connecting: {e:#}\n{}", sshd.log_tail()))
}

fn new_spool() -> (tempfile::TempDir, LocalSpool) {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalSpool::new(dir.path());
    for d in DIRS {
        local.mkdir_all(d).unwrap();
    }
    (dir, local)
}

#[test]
fn sftp_spool_semantics() {
    if skip_without_sshd() {
        return;
    }
    let sshd = TestSshd::start().unwrap();
    let (dir, local) = new_spool();
    let fs = connect(&sshd, dir.path());
    assert_eq!(
        fs.session().cipher().as_deref(),
        Some("aes128-gcm@openssh.com")
    );

    // Missing things keep their error kinds.
    assert_eq!(fs.read("nope").unwrap_err().kind(), io::ErrorKind::NotFound);
    assert_eq!(fs.read_opt("nope").unwrap(), None);
    assert_eq!(fs.size("nope").unwrap(), None);
    assert_eq!(fs.list("no/such/dir").unwrap(), Vec::<String>::new());
    fs.remove("nope").unwrap();
    fs.remove_dir_all("no/such/dir").unwrap();

    // write_atomic creates and replaces.
    fs.write_atomic("status/a.toml", b"one").unwrap();
    assert_eq!(fs.read("status/a.toml").unwrap(), b"one");
    fs.write_atomic("status/a.toml", b"second").unwrap();
    assert_eq!(
        std::fs::read(local.path("status/a.toml")).unwrap(),
        b"second"
    );
    assert_eq!(fs.size("status/a.toml").unwrap(), Some(6));

    // create_exclusive: the first wins, the second sees it exists.
    assert!(fs.create_exclusive("leases/j1", b"mine").unwrap());
    assert!(!fs.create_exclusive("leases/j1", b"yours").unwrap());
    assert_eq!(fs.read("leases/j1").unwrap(), b"mine");

    // rename_noclobber refuses an existing target, with AlreadyExists.
    fs.write_atomic("x/a", b"a").unwrap_err();
    fs.mkdir_all("x/y/z").unwrap();
    fs.mkdir_all("x/y/z").unwrap();
    fs.write_atomic("x/a", b"a").unwrap();
    fs.write_atomic("x/b", b"b").unwrap();
    let e = fs.rename_noclobber("x/a", "x/b").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(fs.read("x/b").unwrap(), b"b");
    // SFTP v3 carries no rename flags: even asked to overwrite, OpenSSH's
    // plain rename refuses an existing target. Replacing needs posix-rename.
    let sftp = fs.session().session().sftp().unwrap();
    let remote = |p: &str| std::path::PathBuf::from(fs.remote_path(p));
    assert!(sftp.rename(&remote("x/a"), &remote("x/b"), None).is_err());
    assert_eq!(fs.read("x/b").unwrap(), b"b");
    fs.rename_noclobber("x/a", "x/c").unwrap();
    assert_eq!(fs.read("x/c").unwrap(), b"a");
    assert_eq!(
        fs.rename_noclobber("x/a", "x/d").unwrap_err().kind(),
        io::ErrorKind::NotFound
    );

    // Listings are sorted and skip temporary files.
    std::fs::write(local.path("x/.tmp.hidden"), b"").unwrap();
    assert_eq!(fs.list("x").unwrap(), ["b", "c", "y"]);

    // Streams, bigger than one write buffer.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    {
        let mut w = fs.create_write("x/big.tmp").unwrap();
        for piece in data.chunks(1_234_567) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
    }
    assert_eq!(std::fs::read(local.path("x/big.tmp")).unwrap(), data);
    let mut back = Vec::new();
    fs.open_read("x/big.tmp")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data);

    fs.remove_dir_all("x").unwrap();
    assert!(!local.path("x").exists());
}
