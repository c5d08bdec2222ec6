//! A job server for the agent's `run` tests: OpenSSH's sshd on 127.0.0.1
//! and a spool made by the master's rules, reaped by the master's own pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::sshd::TestSshd;
use kiln_spool::lease::Lease;
use kiln_spool::master::{self, reap};
use kiln_spool::time::Timestamp;
use kiln_spool::{LocalSpool, SpoolFs};

pub struct Server {
    pub sshd: TestSshd,
    pub dir: tempfile::TempDir,
    pub spool: LocalSpool,
}

impl Server {
    /// An sshd and an empty spool.
    pub fn start() -> Server {
        let sshd = TestSshd::start().expect("starting sshd");
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::new(dir.path());
        master::init(&spool).unwrap();
        Server { sshd, dir, spool }
    }

    /// Packs `root` as the payload `payloads/NAME`.
    pub fn add_payload(&self, name: &str, root: &Path) {
        let st = Command::new("tar")
            .args(["--owner=0", "--group=0", "-C"])
            .arg(root)
            .arg("-cf")
            .arg(self.dir.path().join("payloads").join(name))
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success(), "tar of {} failed", root.display());
    }

    /// Queues a job, as `kiln-master add` does.
    pub fn add_job(&self, text: &str) {
        master::add_job(&self.spool, text, Path::new("test.toml"), Timestamp::now())
            .unwrap_or_else(|e| panic!("adding {text}: {e}"));
    }

    /// The `[[servers]]` entry of an agent config that reaches this server.
    pub fn config_block(&self) -> String {
        format!(
            "[[servers]]\naddress = \"{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\nspool = \"{}\"\n",
            self.sshd.address(),
            self.sshd.user(),
            self.sshd.client_key().display(),
            self.sshd.host_key_line().trim(),
            self.dir.path().display()
        )
    }

    /// Reaps, as `kiln-master serve` does, until `done` or `timeout`.
    pub fn reap_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&LocalSpool) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            for line in reap(&self.spool, Timestamp::now()).unwrap().lines() {
                eprintln!("reap: {line}");
            }
            if done(&self.spool) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The master's signing key as an agent's `image_signers` line.
    pub fn signer_line(&self) -> String {
        master::signing::load_or_create_key(&self.spool)
            .unwrap()
            .0
            .allowed_signers_line("kiln-master")
    }

    /// The upload directory of the job's current lease.
    pub fn upload_dir(&self, job: &str) -> PathBuf {
        let text = self.spool.read(&format!("leases/{job}")).unwrap();
        let lease = Lease::parse(&String::from_utf8(text).unwrap()).unwrap();
        self.spool.path(&format!("incoming/{job}/{}", lease.token))
    }
}
