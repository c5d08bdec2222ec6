//! kiln end to end, as a technician meets it: VMs PXE-boot through iPXE and
//! QEMU's TFTP into the initramfs whose /init is kiln-agent, claim jobs from
//! a spool that OpenSSH's sshd serves on 127.0.0.1 (10.0.2.2 from the
//! guests) as set up by `kiln-master init --agent-user` and `agent-key`
//! (agents log in as the agents' account, chrooted, SFTP only), build on
//! their virtio disks and upload; `kiln-master reap` publishes the verified
//! images; and a published image boots in a fresh VM.
//!
//! The scenarios run one at a time: under TCG every VM keeps a core busy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_e2e::binaries::kiln_agent_musl;
use kiln_e2e::kernel::{kernel, repo_root};
use kiln_e2e::qemu::{create_disk, DiskFormat, Qemu, Vm};
use kiln_e2e::rig::{require_tools as require_tools_for, view, Rig, CMDLINE};
use kiln_e2e::sshd::keygen;
use kiln_initramfs::Config;
use kiln_spool::master::{JobState, JobView};
use kiln_spool::upload::{IMAGE_FILE, MANIFEST, PUBLISHED};

/// From PXE to a published image, on a loaded 2-core machine under TCG.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DISK_MIB: u64 = 256;
const OS_PAYLOAD: &str = "os-root.tar";
const APP_PAYLOAD: &str = "hello-app.tar";
const APP_MARKER: &str = "hello-app 1.0";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn require_tools() {
    require_tools_for(&[("zstd", "zstd"), ("tar", "tar")]);
}

/// What these scenarios add to the shared rig: their payloads, jobs and
/// machines.
trait Scenario {
    fn add_payload(&self, file: &Path) -> Result<()>;
    fn add_jobs(&self, jobs: &[(&str, String)]) -> Result<()>;
    fn os_payload(&self) -> Result<PathBuf>;
    fn app_payload(&self) -> Result<PathBuf>;
    fn machine(&self, name: &str) -> Result<Vm>;
    fn wait_jobs(&self, ids: &[&str], vms: &[&Vm]) -> Result<Vec<JobView>>;
}

impl Scenario for Rig {
    fn add_payload(&self, file: &Path) -> Result<()> {
        self.master(&["payload", "add", &file.display().to_string()])?;
        Ok(())
    }

    fn add_jobs(&self, jobs: &[(&str, String)]) -> Result<()> {
        let mut files = Vec::new();
        for (id, text) in jobs {
            let f = self.path(&format!("{id}.toml"));
            std::fs::write(&f, text)?;
            files.push(f.display().to_string());
        }
        let mut args = vec!["add"];
        args.extend(files.iter().map(String::as_str));
        self.master(&args)?;
        Ok(())
    }

    /// The small Linux root: busybox-static and an init that reports.
    fn os_payload(&self) -> Result<PathBuf> {
        let out = self.path(OS_PAYLOAD);
        let script = repo_root().join("tests/scripts/make-os-payload.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
        Ok(out)
    }

    /// The application: /opt/hello with a program and its marker.
    fn app_payload(&self) -> Result<PathBuf> {
        let root = self.path("app-root");
        std::fs::create_dir_all(root.join("opt/hello/bin"))?;
        std::fs::write(root.join("opt/hello/marker"), format!("{APP_MARKER}\n"))?;
        std::fs::write(
            root.join("opt/hello/bin/hello"),
            "#!/bin/sh\necho hello from kiln\n",
        )?;
        let out = self.path(APP_PAYLOAD);
        tar(&root, &out)?;
        Ok(out)
    }

    /// A PXE-booted VM with an empty disk; `name` is its agent id.
    fn machine(&self, name: &str) -> Result<Vm> {
        let disk = self.path(&format!("{name}.qcow2"));
        create_disk(&disk, DISK_MIB, DiskFormat::Qcow2)?;
        self.boot(Qemu::new(name).disk(&disk).memory_mib(1024), name, "")
    }

    /// Reaps until every job in `ids` is done or has failed. Fails when a
    /// VM stops first.
    fn wait_jobs(&self, ids: &[&str], vms: &[&Vm]) -> Result<Vec<JobView>> {
        self.wait_finished(ids, vms, BUILD_TIMEOUT, false)
    }
}

fn tar(root: &Path, out: &Path) -> Result<()> {
    let status = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["--owner=0", "--group=0", "-cf"])
        .arg(out)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar {} failed ({status})", out.display());
    }
    Ok(())
}

/// A job on one ext4 root filling the disk, with the small Linux root.
fn small_job(id: &str, priority: u32, extra: &str) -> String {
    format!(
        "id = \"{id}\"\npriority = {priority}\ntime_limit = \"15m\"\nmax_attempts = 1\n\n\
         [disk]\ndevice = \"auto\"\ntable = \"gpt\"\n\n\
         [[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\n\
         [[payloads]]\nname = \"{OS_PAYLOAD}\"\n{extra}\n\
         [configure]\nhostname = \"{id}\"\n"
    )
}

/// The initrd that boots a deployed image: loads virtio and ext4, finds the
/// partition named `root` and switches into it.
const IMAGE_INIT: &str = include_str!("../fixtures/image-init.sh");

fn image_initrd(dir: &Path) -> Result<PathBuf> {
    let k = kernel()?;
    let init = dir.join("image-init.sh");
    std::fs::write(&init, IMAGE_INIT)?;
    let spec = Config {
        agent: Some(init),
        kernel_modules: Some(k.modules.clone()),
        modules: Some(vec![
            "virtio_pci".into(),
            "virtio_blk".into(),
            "ext4".into(),
        ]),
        tools: Some(vec![]),
        ..Config::default()
    }
    .into_spec()?;
    let out = dir.join("image-initrd.img");
    kiln_initramfs::write_image(&spec, &out).context("packing the image's initrd")?;
    Ok(out)
}

#[test]
fn a_pxe_booted_machine_builds_and_uploads_and_the_published_image_boots() {
    require_tools();
    let _one = one_at_a_time();
    let rig = Rig::new("deploy", None, "").unwrap();
    rig.add_payload(&rig.os_payload().unwrap()).unwrap();
    rig.add_payload(&rig.app_payload().unwrap()).unwrap();
    let ops_key = rig.path("ops_key");
    keygen(&ops_key, "ops@kiln-e2e").unwrap();
    let ops_pub = std::fs::read_to_string(ops_key.with_extension("pub")).unwrap();
    let job = format!(
        r#"id = "deploy"
priority = 500
time_limit = "15m"
max_attempts = 1
description = "a small Linux root with an application"

[disk]
device = "auto"
table = "gpt"

[[disk.partitions]]
label = "ESP"
size = "32MiB"
kind = "esp"
fs = "vfat"
mount = "/boot/efi"

[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"

[[payloads]]
name = "{OS_PAYLOAD}"

[[payloads]]
name = "{APP_PAYLOAD}"

[configure]
hostname = "kiln-e2e-host"

[[configure.users]]
name = "ops"
uid = 1000
gid = 1000
shell = "/bin/sh"
authorized_keys = ["{key}"]

[[configure.files]]
path = "/etc/motd"
content = "built by kiln e2e\n"

[[steps]]
name = "mark"
run = "echo step-ran > /etc/kiln-step"
where = "target"
time_limit = "2m"
"#,
        key = ops_pub.trim()
    );
    rig.add_jobs(&[("deploy", job)]).unwrap();

    let builder = rig.machine("builder").unwrap();
    let views = rig.wait_jobs(&["deploy"], &[&builder]).unwrap();
    let v = view(&views, "deploy");
    assert_eq!(v.state, JobState::Done, "deploy: {}", v.message);
    let console = builder.serial();
    for line in [
        "kiln: kiln-agent ",
        "kiln: config: /etc/kiln/agent.toml",
        "kiln: modules: filesystems ready",
        "kiln: disk: /dev/vda (256 MiB)",
        "kiln: net: eth0: lease 10.0.2.15/24",
        "kiln: net: default route via eth0",
        "kiln: agent builder: asking the job servers for work",
        "kiln: claimed deploy on 10.0.2.2:",
        "kiln: deploy: uploaded",
    ] {
        assert!(
            console.contains(line),
            "the builder's console lacks {line:?}"
        );
    }
    drop(builder);

    // The published image and its records.
    let images = rig.spool.join("images/deploy");
    for f in [IMAGE_FILE, MANIFEST, PUBLISHED] {
        assert!(images.join(f).is_file(), "images/deploy/{f} is missing");
    }
    assert_eq!(rig.history("deploy").unwrap().agent, "builder");
    let verify = Command::new(kiln_agent_musl().unwrap())
        .arg("verify")
        .arg(images.join(IMAGE_FILE))
        .arg("--manifest")
        .arg(images.join(MANIFEST))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "kiln-agent verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Deploy it: decompress onto a fresh disk and boot it.
    let disk = rig.path("deployed.raw");
    let status = Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(images.join(IMAGE_FILE))
        .arg("-o")
        .arg(&disk)
        .status()
        .unwrap();
    assert!(status.success(), "zstd -d failed");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        DISK_MIB << 20,
        "the image restores the whole disk"
    );
    let initrd = image_initrd(rig.dir()).unwrap();
    let k = kernel().unwrap();
    let deployed = Qemu::new("deployed")
        .memory_mib(512)
        .kernel(&k.vmlinuz, &initrd, CMDLINE)
        .disk(&disk)
        .spawn()
        .unwrap();
    let console = deployed
        .wait_for_serial(BOOT_TIMEOUT, "KILN-IMAGE: done")
        .unwrap();
    for line in [
        "KILN-INITRD: root is /dev/vda2",
        "KILN-IMAGE: booted kiln test OS (busybox)",
        "KILN-IMAGE: root /dev/vda2 ext4 rw",
        "KILN-IMAGE: hostname kiln-e2e-host",
        &format!("KILN-IMAGE: app {APP_MARKER}"),
        "KILN-IMAGE: user ops uid 1000 home /home/ops shell /bin/sh keys 1",
        "KILN-IMAGE: motd built by kiln e2e",
        "KILN-IMAGE: step step-ran",
    ] {
        assert!(
            console.contains(line),
            "the deployed machine's console lacks {line:?}"
        );
    }
    deployed
        .wait_exit(Duration::from_secs(60))
        .expect("the deployed machine powers off");
}

#[test]
fn two_machines_take_three_jobs_by_priority_each_once() {
    require_tools();
    let _one = one_at_a_time();
    let rig = Rig::new("priorities", None, "").unwrap();
    rig.add_payload(&rig.os_payload().unwrap()).unwrap();
    let jobs = [("urgent", 900), ("normal", 500), ("later", 100)];
    rig.add_jobs(
        &jobs
            .iter()
            .map(|(id, p)| (*id, small_job(id, *p, "")))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let list = rig.master(&["list"]).unwrap();
    let pos = |id: &str| {
        list.find(id)
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"))
    };
    assert!(
        pos("urgent") < pos("normal") && pos("normal") < pos("later"),
        "{list}"
    );

    let a = rig.machine("agent-a").unwrap();
    let b = rig.machine("agent-b").unwrap();
    let ids: Vec<&str> = jobs.iter().map(|(id, _)| *id).collect();
    let views = rig.wait_jobs(&ids, &[&a, &b]).unwrap();

    let consoles = [a.serial(), b.serial()];
    let mut started = Vec::new();
    for id in &ids {
        let v = view(&views, id);
        assert_eq!(v.state, JobState::Done, "{id}: {}", v.message);
        let h = rig.history(id).unwrap();
        assert_eq!(h.entry.attempts, 1, "{id} was attempted more than once");
        assert!(
            ["agent-a", "agent-b"].contains(&h.agent.as_str()),
            "{id} built by {}",
            h.agent
        );
        let claims: usize = consoles
            .iter()
            .map(|c| c.matches(&format!("kiln: claimed {id} on ")).count())
            .sum();
        assert_eq!(claims, 1, "{id} was claimed {claims} times");
        assert!(rig.spool.join("images").join(id).join(IMAGE_FILE).is_file());
        started.push(
            h.status
                .expect("a history record keeps the last status")
                .started,
        );
    }
    // The highest priority was claimed first.
    assert!(
        started[0] <= started[1] && started[0] <= started[2],
        "claim times by priority: {started:?}"
    );
}

#[test]
fn a_payload_that_fails_its_hash_fails_the_job_and_the_machine_goes_on() {
    require_tools();
    let _one = one_at_a_time();
    let rig = Rig::new("bad-job", None, "").unwrap();
    rig.add_payload(&rig.os_payload().unwrap()).unwrap();
    let app = rig.app_payload().unwrap();
    let tampered = rig.path("tampered.tar");
    std::fs::copy(&app, &tampered).unwrap();
    rig.add_payload(&tampered).unwrap();
    let extra = "\n[[payloads]]\nname = \"tampered.tar\"\n";
    rig.add_jobs(&[
        ("broken", small_job("broken", 900, extra)),
        ("good", small_job("good", 100, "")),
    ])
    .unwrap();
    // The spool's copy changes after the job pinned its hash.
    let in_spool = rig.spool.join("payloads/tampered.tar");
    let mut bytes = std::fs::read(&in_spool).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&in_spool, bytes).unwrap();

    let vm = rig.machine("agent-c").unwrap();
    let views = rig.wait_jobs(&["broken", "good"], &[&vm]).unwrap();
    let broken = view(&views, "broken");
    assert_eq!(broken.state, JobState::Failed, "broken: {}", broken.message);
    assert!(
        broken.message.contains("tampered.tar") && broken.message.contains("BLAKE3"),
        "the failure names the payload and the hash: {}",
        broken.message
    );
    let good = view(&views, "good");
    assert_eq!(good.state, JobState::Done, "good: {}", good.message);
    assert!(!rig.spool.join("images/broken").exists());

    let listing = rig.master(&["list"]).unwrap();
    assert!(
        listing
            .lines()
            .any(|l| l.contains("broken") && l.contains("failed")),
        "kiln-master list shows the failure:\n{listing}"
    );
    let console = vm.serial();
    let failed_at = console
        .find("kiln: broken: failed")
        .expect("the console reports the failed job");
    let good_at = console
        .find("kiln: claimed good on ")
        .expect("the machine claims the next job");
    assert!(failed_at < good_at, "the next job came after the failure");
}

#[test]
fn fatal_errors_are_explained_then_reboot_or_keep_a_rescue_shell() {
    require_tools();
    let _one = one_at_a_time();
    let rig = Rig::new("fatal", None, "").unwrap();

    let vm = rig
        .boot(Qemu::new("diskless").memory_mib(1024), "diskless", "")
        .unwrap();
    let console = vm
        .wait_for_serial(BOOT_TIMEOUT, "kiln: rebooting in 10s")
        .unwrap();
    assert!(
        console.contains("kiln: FATAL: no disk for disk = \"auto\""),
        "the console names the reason"
    );
    // The guest reboots; with -no-reboot QEMU ends.
    vm.wait_exit(Duration::from_secs(60))
        .expect("the machine reboots after the delay");
    drop(vm);

    // A bad kernel command line is as fatal; kiln.debug=1 keeps a shell.
    let vm = rig
        .boot(
            Qemu::new("bad-cmdline"),
            "bad-cmdline",
            "kiln.poll_interval=soon kiln.debug=1",
        )
        .unwrap();
    let console = vm
        .wait_for_serial(BOOT_TIMEOUT, "kiln.debug=1: rescue shell on the console")
        .unwrap();
    let fatal = console
        .lines()
        .find(|l| l.starts_with("kiln: FATAL: /proc/cmdline: "))
        .unwrap_or_else(|| panic!("no FATAL line for the command line:\n{console}"));
    assert!(fatal.contains("kiln.poll_interval"), "{fatal}");
    assert!(
        !console.contains("kiln: rebooting"),
        "a debug machine keeps its shell"
    );
    assert!(vm.exit_status().unwrap().is_none(), "the machine stays up");
}
