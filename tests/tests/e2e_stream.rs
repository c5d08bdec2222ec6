//! Memory bounded whatever the image: a PXE-booted VM with 384 MiB of RAM
//! builds a job whose payload and image are each larger than half its RAM
//! (about 220 MiB from /dev/urandom, so compression cannot hide them); the
//! payload streams into extraction and the capture into the upload, and
//! `kiln-master reap` publishes the verified image. With a payload or an
//! image staged in the agent's RAM (a tmpfs of half the memory), the build
//! cannot finish.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_e2e::binaries::kiln_agent_musl;
use kiln_e2e::job_server::JobServer;
use kiln_e2e::kernel::{kernel, repo_root};
use kiln_e2e::pxe::{pxe_dir, BOOT_SCRIPT};
use kiln_e2e::qemu::{create_disk, require_qemu, DiskFormat, Qemu, Vm};
use kiln_e2e::sshd::require_sshd;
use kiln_e2e::wait::wait_until;
use kiln_initramfs::config::ExtraFile;
use kiln_initramfs::Config;
use kiln_spool::master::{job_views, JobState, JobView};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{IMAGE_FILE, MANIFEST};
use kiln_spool::LocalSpool;

/// From PXE to a published image of about 220 MiB, under TCG on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
const CMDLINE: &str = "console=ttyS0,115200 panic=-1 loglevel=4";
const RAM_MIB: u32 = 384;
const DISK_MIB: u64 = 640;
/// Bytes of /dev/urandom in the payload: more than half the VM's RAM.
const NOISE_MIB: u64 = 220;
const OS_PAYLOAD: &str = "os-root.tar";
const NOISE_PAYLOAD: &str = "noise.tar";

fn require_tools() {
    require_qemu();
    require_sshd();
    for (tool, package) in [("zstd", "zstd"), ("tar", "tar"), ("head", "coreutils")] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: scripts/install-deps.sh installs {package}"
        );
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: scripts/install-deps.sh installs busybox-static"
    );
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// A job server set up by `kiln-master init --agent-user` and
/// `agent-key`, and the initramfs that points agents at it.
struct Rig {
    dir: tempfile::TempDir,
    server: JobServer,
    initramfs: PathBuf,
}

impl Rig {
    fn new() -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-stream.")
            .tempdir()
            .context("creating the scenario's directory")?;
        let server = JobServer::start()?;
        let login = server.agent_server_at(&format!("10.0.2.2:{}", server.sshd().port()));
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "poll_interval = \"2s\"\ndisk = \"auto\"\nupload_window = \"32MiB\"\n\n[[servers]]\n\
                 address = \"{}\"\nuser = \"{}\"\nkey = \"/etc/kiln/agent_key\"\nhost_key = \"{}\"\nspool = \"{}\"\n",
                login.address, login.user, login.host_key, login.spool,
            ),
        )?;
        let k = kernel()?;
        let agent = kiln_agent_musl()?;
        let spec = Config {
            agent: Some(agent),
            agent_config: Some(config),
            kernel_modules: Some(k.modules.clone()),
            files: vec![ExtraFile {
                src: server.agent_key(),
                dest: "/etc/kiln/agent_key".into(),
                mode: 0o600,
            }],
            ..Config::default()
        }
        .into_spec()?;
        let initramfs = dir.path().join("initramfs.img");
        kiln_initramfs::write_image(&spec, &initramfs).context("packing the initramfs")?;
        Ok(Rig {
            dir,
            server,
            initramfs,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn payloads(&self) -> Result<()> {
        let os = self.path(OS_PAYLOAD);
        let script = repo_root().join("tests/scripts/make-os-payload.sh");
        run(
            Command::new("bash")
                .arg(&script)
                .arg(&os)
                .stdout(Stdio::null()),
            &script.display().to_string(),
        )?;
        let root = self.path("noise-root");
        std::fs::create_dir_all(root.join("srv"))?;
        run(
            Command::new("head")
                .args(["-c", &format!("{NOISE_MIB}M"), "/dev/urandom"])
                .stdout(std::fs::File::create(root.join("srv/noise.bin"))?),
            "head -c /dev/urandom",
        )?;
        let noise = self.path(NOISE_PAYLOAD);
        run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .args(["--owner=0", "--group=0", "-cf"])
                .arg(&noise)
                .arg("."),
            "tar",
        )?;
        std::fs::remove_dir_all(&root)?;
        for p in [&os, &noise] {
            self.server
                .master(&["payload", "add", &p.display().to_string()])?;
        }
        Ok(())
    }

    fn machine(&self, name: &str) -> Result<Vm> {
        let disk = self.path(&format!("{name}.qcow2"));
        create_disk(&disk, DISK_MIB, DiskFormat::Qcow2)?;
        let k = kernel()?;
        let tftp = pxe_dir(
            &self.path(&format!("pxe-{name}")),
            &k.vmlinuz,
            &self.initramfs,
            &format!("{CMDLINE} kiln.id={name}"),
        )?;
        Qemu::new(name)
            .disk(&disk)
            .memory_mib(RAM_MIB)
            .pxe(&tftp, BOOT_SCRIPT)
            .spawn()
    }

    fn views(&self) -> Result<Vec<JobView>> {
        Ok(job_views(
            &LocalSpool::new(self.server.spool()),
            Timestamp::now(),
        )?)
    }
}

#[test]
fn a_384mib_machine_builds_and_uploads_a_payload_and_image_each_over_half_its_ram() {
    require_tools();
    let rig = Rig::new().unwrap();
    rig.payloads().unwrap();
    let job = format!(
        "id = \"big\"\npriority = 500\ntime_limit = \"30m\"\nmax_attempts = 1\n\n\
         [disk]\ndevice = \"auto\"\ntable = \"gpt\"\n\n\
         [[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\n\
         [[payloads]]\nname = \"{OS_PAYLOAD}\"\n\n\
         [[payloads]]\nname = \"{NOISE_PAYLOAD}\"\n\n\
         [configure]\nhostname = \"big\"\n"
    );
    let file = rig.path("big.toml");
    std::fs::write(&file, job).unwrap();
    rig.server
        .master(&["add", &file.display().to_string()])
        .unwrap();

    let vm = rig.machine("small").unwrap();
    let mut last_reap: Option<Instant> = None;
    let mut last_line = String::new();
    let views = wait_until(BUILD_TIMEOUT, "job big to finish", || {
        if last_reap.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            rig.server.master(&["reap"])?;
            last_reap = Some(Instant::now());
        }
        if let Some(status) = vm.exit_status()? {
            bail!("vm small stopped ({status}) before the job finished");
        }
        let views = rig.views()?;
        if let Some(v) = views.iter().find(|v| v.id == "big") {
            let line = format!(
                "{}{}",
                v.state.as_str(),
                v.phase
                    .map(|p| format!(" ({})", p.as_str()))
                    .unwrap_or_default()
            );
            if line != last_line {
                eprintln!("big: {line}");
                last_line = line;
            }
            if matches!(v.state, JobState::Done | JobState::Failed) {
                return Ok(Some(views));
            }
        }
        Ok(None)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n--- serial ---\n{}", vm.serial()));
    let v = views.iter().find(|v| v.id == "big").unwrap();
    assert_eq!(
        v.state,
        JobState::Done,
        "big: {}\n--- serial ---\n{}",
        v.message,
        vm.serial()
    );
    drop(vm);

    let images = rig.server.spool().join("images/big");
    let image = images.join(IMAGE_FILE);
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(
        size > u64::from(RAM_MIB / 2) << 20,
        "the image is {size} bytes, not over half the VM's RAM"
    );
    let payload = std::fs::metadata(rig.server.spool().join("payloads").join(NOISE_PAYLOAD))
        .unwrap()
        .len();
    assert!(payload > u64::from(RAM_MIB / 2) << 20, "{payload} bytes");
    let verify = Command::new(kiln_agent_musl().unwrap())
        .arg("verify")
        .arg(&image)
        .arg("--manifest")
        .arg(images.join(MANIFEST))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "kiln-agent verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
