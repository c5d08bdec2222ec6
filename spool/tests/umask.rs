//! A master that runs with a strict umask still leaves what agents read
//! readable: the spool's files get the modes the layout gives them. (Its
//! own test binary: the umask is the whole process's.)

use std::os::unix::fs::PermissionsExt;

use kiln_spool::{LocalSpool, SpoolFs};

#[test]
fn files_the_master_writes_keep_their_mode_under_umask_077() {
    let dir = tempfile::tempdir().unwrap();
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let spool = LocalSpool::new(dir.path());
    spool.write_atomic("jobs.toml", b"x").unwrap();
    assert!(spool.create_exclusive("job.toml", b"y").unwrap());
    assert!(spool.create_private("key", b"z").unwrap());
    spool.mkdir_all("images/web/x").unwrap();
    {
        use std::io::Write;
        let mut w = spool.create_write("images/web/image.raw.zst").unwrap();
        w.write_all(b"zstd").unwrap();
    }
    nix::sys::stat::umask(old);
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("jobs.toml"), 0o644, "jobs.toml");
    assert_eq!(mode("job.toml"), 0o644, "job.toml");
    assert_eq!(mode("key"), 0o600, "the signing key");
    assert_eq!(mode("images/web"), 0o755, "a published image's directory");
    assert_eq!(mode("images/web/image.raw.zst"), 0o644, "a published image");
}
