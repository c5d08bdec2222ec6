//! The PXE scenarios' rig: a job server set up by `kiln-master init
//! --agent-user` and `agent-key` (OpenSSH's sshd on 127.0.0.1, 10.0.2.2
//! from the guests), the initramfs that points agents at it (they log in as
//! the agents' account with agent-key's key), VMs that PXE-boot into it,
//! and the master's passes while they work.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_initramfs::config::ExtraFile;
use kiln_initramfs::Config;
use kiln_spool::master::{job_views, HistoryRecord, JobState, JobView};
use kiln_spool::spool::history_path;
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;

use crate::binaries::kiln_agent_musl;
use crate::job_server::{JobServer, AGENT_USER};
use crate::kernel::kernel;
use crate::pxe::{pxe_dir, BOOT_SCRIPT};
use crate::qemu::{require_qemu, require_tool, Qemu, Vm};
use crate::sshd::require_sshd;
use crate::wait::wait_until;

/// The kernel command line of PXE-booted agents (`kiln.id=NAME` is added).
pub const CMDLINE: &str = "console=ttyS0,115200 panic=-1 loglevel=4";

/// Fails, naming the package, when QEMU, sshd or one of `tools` (a command
/// and the package that installs it) is missing.
pub fn require_tools(tools: &[(&str, &str)]) {
    require_qemu();
    require_sshd();
    for (tool, package) in tools {
        require_tool(tool, package);
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: scripts/install-deps.sh installs busybox-static"
    );
}

/// A job server with its spool and the initramfs that points agents at it.
pub struct Rig {
    dir: tempfile::TempDir,
    pub server: JobServer,
    pub spool: PathBuf,
    pub initramfs: PathBuf,
    last_line: Mutex<String>,
}

impl Rig {
    /// A rig whose scratch directory is `kiln-e2e-NAME.*` under `parent`
    /// (the system's temporary directory if `None`). `config` is added to
    /// the agents' `agent.toml` before its `[[servers]]`.
    pub fn new(name: &str, parent: Option<&Path>, config: &str) -> Result<Rig> {
        Rig::new_with(name, parent, |_| Ok(config.to_string()))
    }

    /// As [`Rig::new`], with the agents' extra config made from the
    /// running job server (to print the master's signer, say).
    pub fn new_with(
        name: &str,
        parent: Option<&Path>,
        config: impl FnOnce(&JobServer) -> Result<String>,
    ) -> Result<Rig> {
        let mut b = tempfile::Builder::new();
        let prefix = format!("kiln-e2e-{name}.");
        b.prefix(&prefix);
        let dir = match parent {
            Some(p) => b.tempdir_in(p),
            None => b.tempdir(),
        }
        .context("creating the scenario's directory")?;
        let server = JobServer::start()?;
        let rig = Rig {
            initramfs: dir.path().join("initramfs.img"),
            spool: server.spool().to_path_buf(),
            dir,
            server,
            last_line: Mutex::new(String::new()),
        };
        // The guests reach the host's 127.0.0.1 as 10.0.2.2.
        let login = rig
            .server
            .agent_server_at(&format!("10.0.2.2:{}", rig.server.sshd().port()));
        assert_eq!(login.user, AGENT_USER);
        let config = config(&rig.server)?;
        let agent_toml = rig.path("agent.toml");
        std::fs::write(
            &agent_toml,
            format!(
                "poll_interval = \"2s\"\ndisk = \"auto\"\n{config}\n\n[[servers]]\n\
                 address = \"{address}\"\nuser = \"{user}\"\n\
                 key = \"/etc/kiln/agent_key\"\nhost_key = \"{host_key}\"\nspool = \"{spool}\"\n",
                address = login.address,
                user = login.user,
                host_key = login.host_key,
                spool = login.spool,
            ),
        )?;
        let k = kernel()?;
        let spec = Config {
            agent: Some(kiln_agent_musl()?),
            agent_config: Some(agent_toml),
            kernel_modules: Some(k.modules.clone()),
            files: vec![ExtraFile {
                src: rig.server.agent_key(),
                dest: "/etc/kiln/agent_key".into(),
                mode: 0o600,
            }],
            ..Config::default()
        }
        .into_spec()?;
        kiln_initramfs::write_image(&spec, &rig.initramfs).context("packing the initramfs")?;
        Ok(rig)
    }

    /// A path in the rig's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `kiln-master --spool SPOOL ARGS`; returns its output.
    pub fn master(&self, args: &[&str]) -> Result<String> {
        self.server.master(args)
    }

    pub fn views(&self) -> Result<Vec<JobView>> {
        Ok(job_views(&LocalSpool::new(&self.spool), Timestamp::now())?)
    }

    pub fn history(&self, id: &str) -> Result<HistoryRecord> {
        let path = self.spool.join(history_path(id));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        HistoryRecord::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// PXE-boots `vm` into the initramfs as agent `name`, with `extra` on
    /// the kernel command line.
    pub fn boot(&self, vm: Qemu, name: &str, extra: &str) -> Result<Vm> {
        let k = kernel()?;
        let tftp = pxe_dir(
            &self.path(&format!("pxe-{name}")),
            &k.vmlinuz,
            &self.initramfs,
            &format!("{CMDLINE} kiln.id={name} {extra}"),
        )?;
        vm.pxe(&tftp, BOOT_SCRIPT).spawn()
    }

    /// Reaps every two seconds, as `kiln-master serve` would, until every
    /// job in `ids` is done or has failed; prints the jobs' states as they
    /// change. Fails when one of `vms` stops first, unless `may_reboot`
    /// (a deploy reboots into what it wrote, and QEMU runs with
    /// `-no-reboot`).
    pub fn wait_finished(
        &self,
        ids: &[&str],
        vms: &[&Vm],
        timeout: Duration,
        may_reboot: bool,
    ) -> Result<Vec<JobView>> {
        let mut last_reap: Option<Instant> = None;
        let started = Instant::now();
        wait_until(timeout, &format!("jobs {ids:?} to finish"), || {
            if last_reap.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                self.master(&["reap"])?;
                last_reap = Some(Instant::now());
            }
            for vm in vms {
                if let Some(status) = vm.exit_status()? {
                    if !may_reboot {
                        bail!(
                            "vm {} stopped ({status}) before the jobs finished",
                            vm.name()
                        );
                    }
                }
            }
            let views = self.views()?;
            self.show_progress(&views, started);
            let finished = ids.iter().all(|id| {
                views.iter().any(|v| {
                    v.id == *id
                        && matches!(
                            v.state,
                            JobState::Done
                                | JobState::Failed
                                | JobState::Invalid
                                | JobState::Cancelled
                        )
                })
            });
            Ok(finished.then_some(views))
        })
    }

    fn show_progress(&self, views: &[JobView], started: Instant) {
        let line = views
            .iter()
            .map(|v| {
                format!(
                    "{} {}{}",
                    v.id,
                    v.state.as_str(),
                    v.phase
                        .map(|p| format!(" ({})", p.as_str()))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if *last != line {
            eprintln!("{:4} s spool: {line}", started.elapsed().as_secs());
            *last = line;
        }
    }
}

/// The job `id` among `views`.
pub fn view<'a>(views: &'a [JobView], id: &str) -> &'a JobView {
    views
        .iter()
        .find(|v| v.id == id)
        .unwrap_or_else(|| panic!("job {id} is not in the spool"))
}
