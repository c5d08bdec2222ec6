//! Memory bounded whatever the image: a PXE-booted VM with 384 MiB of RAM
//! builds a job whose payload and image are each larger than half its RAM
//! (about 220 MiB from /dev/urandom, so compression cannot hide them); the
//! payload streams into extraction and the capture into the upload, and
//! `kiln-master reap` publishes the verified image. With a payload or an
//! image staged in the agent's RAM (a tmpfs of half the memory), the build
//! cannot finish.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_e2e::binaries::kiln_agent_musl;
use kiln_e2e::kernel::repo_root;
use kiln_e2e::qemu::{create_disk, DiskFormat, Qemu, Vm};
use kiln_e2e::rig::{require_tools as require_tools_for, Rig};
use kiln_spool::master::JobState;
use kiln_spool::upload::{IMAGE_FILE, MANIFEST};

/// From PXE to a published image of about 220 MiB, under TCG on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
const RAM_MIB: u32 = 384;
const DISK_MIB: u64 = 640;
/// Bytes of /dev/urandom in the payload: more than half the VM's RAM.
const NOISE_MIB: u64 = 220;
const OS_PAYLOAD: &str = "os-root.tar";
const NOISE_PAYLOAD: &str = "noise.tar";

fn require_tools() {
    require_tools_for(&[("zstd", "zstd"), ("tar", "tar"), ("head", "coreutils")]);
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// This scenario's payloads and machine on the shared rig.
trait Scenario {
    fn payloads(&self) -> Result<()>;
    fn machine(&self, name: &str) -> Result<Vm>;
}

impl Scenario for Rig {
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
            self.master(&["payload", "add", &p.display().to_string()])?;
        }
        Ok(())
    }

    fn machine(&self, name: &str) -> Result<Vm> {
        let disk = self.path(&format!("{name}.qcow2"));
        create_disk(&disk, DISK_MIB, DiskFormat::Qcow2)?;
        self.boot(Qemu::new(name).disk(&disk).memory_mib(RAM_MIB), name, "")
    }
}

#[test]
fn a_384mib_machine_builds_and_uploads_a_payload_and_image_each_over_half_its_ram() {
    require_tools();
    let rig = Rig::new("stream", None, "upload_window = \"32MiB\"").unwrap();
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
    rig.master(&["add", &file.display().to_string()]).unwrap();

    let vm = rig.machine("small").unwrap();
    let views = rig
        .wait_finished(&["big"], &[&vm], BUILD_TIMEOUT, false)
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

    let images = rig.spool.join("images/big");
    let image = images.join(IMAGE_FILE);
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(
        size > u64::from(RAM_MIB / 2) << 20,
        "the image is {size} bytes, not over half the VM's RAM"
    );
    let payload = std::fs::metadata(rig.spool.join("payloads").join(NOISE_PAYLOAD))
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
