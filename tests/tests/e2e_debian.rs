//! A real Debian image that boots by itself: a PXE-booted VM builds
//! examples/jobs/debian.toml with the payload of
//! scripts/make-debian-payload.sh (made once per machine, then cached), the
//! master publishes it, and two copies of the published image boot with no
//! `-kernel`: one under OVMF (UEFI), one under SeaBIOS. Over SSH, as the
//! job's user with its key, each shows the job's hostname, user and
//! groups, an fstab and a root by UUID, the step's marker, no failed unit,
//! and host keys and a machine-id of its own. Then a deploy job writes the
//! published image onto a PXE-booted VM with a disk twice as large; it
//! reboots, boots by firmware alone and its root fills the larger disk.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_e2e::kernel::repo_root;
use kiln_e2e::qemu::{create_disk, DiskFormat, Qemu, Vm};
use kiln_e2e::rig::{require_tools as require_tools_for, view, Rig};
use kiln_e2e::sshd::keygen;
use kiln_e2e::wait::wait_until;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::master::{JobState, JobView};
use kiln_spool::upload::{IMAGE_FILE, MANIFEST};

/// PXE power-on to a published image under TCG on a loaded 2-core machine
/// (about 200 s alone).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
/// First boot of the image to SSH answering (about 40 s alone).
const SSH_TIMEOUT: Duration = Duration::from_secs(400);
const DISK_MIB: u64 = 2048;
const PAYLOAD: &str = "debian-bookworm.tar.zst";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// Fails, naming the package, when a tool the scenario needs is missing.
fn require_tools() {
    require_tools_for(&[
        ("zstd", "zstd"),
        ("sfdisk", "fdisk"),
        ("qemu-img", "qemu-utils"),
    ]);
    // ssh has no --version.
    let ssh = Command::new("ssh")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ssh,
        "ssh is missing: scripts/install-deps.sh installs openssh-client"
    );
    for (file, package) in [
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
        (SEABIOS, "seabios"),
    ] {
        assert!(
            Path::new(file).is_file(),
            "{file} is missing: scripts/install-deps.sh installs {package}"
        );
    }
}

/// The Debian payload, from the machine's cache or made now (the script
/// fails, saying why, when mmdebstrap or the mirror is missing).
fn debian_payload() -> Result<PathBuf> {
    let script = repo_root().join("scripts/make-debian-payload.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .with_context(|| format!("{} printed no path", script.display()))?;
    eprintln!(
        "payload: {} ({} s)",
        path.display(),
        started.elapsed().as_secs()
    );
    Ok(path)
}

/// The shared rig, whose agents accept images signed by the master's key
/// as `kiln-master signer` prints it.
fn rig() -> Result<Rig> {
    Rig::new_with("debian", Some(Path::new("/var/tmp")), |server| {
        let out = server.master(&["signer"])?;
        let line = out
            .lines()
            .find(|l| l.contains("ssh-ed25519"))
            .with_context(|| format!("`kiln-master signer` printed no key: {out:?}"))?;
        Ok(format!("image_signers = ['{line}']"))
    })
}

/// A PXE-booted VM with an empty disk of `disk_mib`; `name` is its agent id.
fn pxe_machine(rig: &Rig, name: &str, disk_mib: u64, memory_mib: u32) -> (Vm, PathBuf) {
    let disk = rig.path(&format!("{name}.qcow2"));
    create_disk(&disk, disk_mib, DiskFormat::Qcow2).unwrap();
    let vm = rig
        .boot(Qemu::new(name).memory_mib(memory_mib).disk(&disk), name, "")
        .unwrap();
    (vm, disk)
}

/// Reaps until job `id` is finished; see [`Rig::wait_finished`].
fn wait_finished(rig: &Rig, id: &str, vm: &Vm, may_reboot: bool) -> JobView {
    let views = rig
        .wait_finished(&[id], &[vm], BUILD_TIMEOUT, may_reboot)
        .unwrap_or_else(|e| panic!("{e:#}\n--- serial ---\n{}", vm.serial()));
    view(&views, id).clone()
}

/// The example job, with the test's key for the user.
fn debian_job(key: &str) -> String {
    let example = repo_root().join("examples/jobs/debian.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("authorized_keys = "))
        .expect("the example job has an authorized_keys line");
    text.replace(line, &format!("authorized_keys = [\"{}\"]", key.trim()))
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// A copy of the published disk: a qcow2 overlay on the decompressed image.
fn deployed_copy(base: &Path, out: &Path) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create {} failed", out.display());
}

/// Which firmware boots the copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    Uefi,
    Bios,
}

/// A deployed machine: the VM and the port its sshd is forwarded to.
struct Machine {
    vm: Vm,
    port: u16,
    key: PathBuf,
}

impl Machine {
    fn boot(rig: &Rig, firmware: Firmware, disk: &Path, key: &Path) -> Machine {
        let port = free_port();
        let name = match firmware {
            Firmware::Uefi => "debian-uefi",
            Firmware::Bios => "debian-bios",
        };
        let mut q = Qemu::new(name)
            .memory_mib(1024)
            .disk(disk)
            .no_reboot(false)
            .arg("-netdev")
            .arg(format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"))
            .arg("-device")
            .arg("virtio-net-pci,netdev=net0");
        if firmware == Firmware::Uefi {
            let vars = rig.path(&format!("{name}-vars.fd"));
            std::fs::copy(OVMF_VARS, &vars).unwrap();
            q = q
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
                ))
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
        }
        Machine {
            vm: q.spawn().unwrap(),
            port,
            key: key.to_path_buf(),
        }
    }

    fn ssh_command(&self, cmd: &str) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                "ops@127.0.0.1",
                cmd,
            ])
            .stdin(Stdio::null());
        c
    }

    /// Runs `cmd` over SSH; its stdout, trimmed.
    fn ssh(&self, cmd: &str) -> String {
        let out = self.ssh_command(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "ssh {}: {cmd:?} failed ({}): {}",
            self.vm.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until sshd answers as the job's user; returns how long it took.
    fn wait_ssh(&self) -> Duration {
        let started = Instant::now();
        wait_until(SSH_TIMEOUT, &format!("ssh to {}", self.vm.name()), || {
            if let Some(st) = self.vm.exit_status()? {
                bail!("vm {} stopped ({st})", self.vm.name());
            }
            let ok = self
                .ssh_command("true")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_secs(2));
            }
            Ok(ok.then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        started.elapsed()
    }
}

/// What one deployed machine says about itself.
struct Identity {
    host_key: String,
    machine_id: String,
}

/// Checks a deployed machine over SSH; returns its identity.
fn check_machine(m: &Machine, firmware: Firmware) -> Identity {
    assert_eq!(m.ssh("hostname"), "kiln-debian");
    assert_eq!(m.ssh("id -un"), "ops");
    let groups = m.ssh("id -nG");
    for g in ["ops", "sudo"] {
        assert!(
            groups.split_whitespace().any(|x| x == g),
            "groups: {groups}"
        );
    }
    let efi = m.ssh("test -d /sys/firmware/efi && echo uefi || echo bios");
    let want = match firmware {
        Firmware::Uefi => "uefi",
        Firmware::Bios => "bios",
    };
    assert_eq!(efi, want, "booted by the wrong firmware");

    // The root by UUID: on the kernel command line, in fstab, and mounted.
    let root_uuid = m.ssh("findmnt -no UUID /");
    let cmdline = m.ssh("cat /proc/cmdline");
    assert!(
        cmdline
            .split_whitespace()
            .any(|w| w == format!("root=UUID={root_uuid}")),
        "the kernel's root is not UUID={root_uuid}: {cmdline}"
    );
    assert!(cmdline.contains("console=ttyS0,115200"), "{cmdline}");
    let fstab = m.ssh("cat /etc/fstab");
    let entries: Vec<&str> = fstab
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(
        entries.iter().all(|l| l.starts_with("UUID=")),
        "fstab names a device: {fstab}"
    );
    assert!(
        entries
            .iter()
            .any(|l| l.starts_with(&format!("UUID={root_uuid} / ext4"))),
        "{fstab}"
    );
    assert!(
        entries.iter().any(|l| l.contains(" /boot/efi vfat ")),
        "{fstab}"
    );
    assert_eq!(m.ssh("findmnt -no FSTYPE /boot/efi"), "vfat");

    assert_eq!(m.ssh("cat /etc/kiln-step"), "built-by-kiln");
    let state = m
        .ssh_command("systemctl is-system-running --wait")
        .output()
        .unwrap();
    let failed = m.ssh("systemctl --failed --no-legend --plain");
    assert!(
        failed.is_empty(),
        "failed units on {}: {failed}",
        m.vm.name()
    );
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "running",
        "{}",
        m.vm.name()
    );
    Identity {
        host_key: m.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub"),
        machine_id: m.ssh("cat /etc/machine-id"),
    }
}

#[test]
fn a_debian_image_built_by_kiln_boots_by_itself_under_uefi_and_bios_and_deploys_onto_a_larger_disk()
{
    require_tools();
    let payload = debian_payload().unwrap_or_else(|e| panic!("{e:#}"));
    let rig = rig().unwrap();
    rig.master(&[
        "payload",
        "add",
        "--name",
        PAYLOAD,
        &payload.display().to_string(),
    ])
    .unwrap();
    let key = rig.path("ops_key");
    keygen(&key, "ops@kiln-e2e-debian").unwrap();
    let key_pub = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let job = rig.path("debian.toml");
    std::fs::write(&job, debian_job(&key_pub)).unwrap();
    rig.master(&["add", &job.display().to_string()]).unwrap();

    // Build: PXE power-on to the published image.
    let started = Instant::now();
    let (builder, _) = pxe_machine(&rig, "builder", DISK_MIB, 1536);
    let v = wait_finished(&rig, "debian", &builder, false);
    assert_eq!(v.state, JobState::Done, "debian: {}", v.message);
    // `scripts/bench-debian.sh` reads the `bench:` lines.
    eprintln!("bench: published {} s", started.elapsed().as_secs());
    drop(builder);

    let images = rig.spool.join("images/debian");
    let manifest_path = images.join(MANIFEST);
    let manifest = ImageManifest::parse(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    for p in manifest.phases.iter() {
        eprintln!("bench: phase {} {:.1} s", p.name, p.seconds);
    }

    // Deploy two copies; boot one under OVMF, the other under SeaBIOS.
    let base = rig.path("published.raw");
    let st = Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(images.join(IMAGE_FILE))
        .arg("-o")
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success(), "zstd -d failed");
    let mut ids = Vec::new();
    for firmware in [Firmware::Uefi, Firmware::Bios] {
        let copy = rig.path(&format!("{firmware:?}.qcow2").to_lowercase());
        deployed_copy(&base, &copy);
        let m = Machine::boot(&rig, firmware, &copy, &key);
        let took = m.wait_ssh();
        eprintln!("bench: ssh {firmware:?} {} s", took.as_secs());
        ids.push(check_machine(&m, firmware));
        // Dropping the machine kills its QEMU: the next boot has the CPU.
    }
    let deployed = deploy_onto_a_larger_disk(&rig, &key);
    ids.push(deployed);
    assert_ne!(
        ids[0].host_key, ids[1].host_key,
        "two machines share a host key"
    );
    assert_ne!(
        ids[0].machine_id, ids[1].machine_id,
        "two machines share a machine-id"
    );
    for id in &ids {
        assert_eq!(id.machine_id.len(), 32, "machine-id {:?}", id.machine_id);
    }
}

/// Size of the disk a deploy job writes the published image onto: twice
/// the builder's, so the deploy must grow the root to fill it.
const DEPLOY_DISK_MIB: u64 = 2 * DISK_MIB;

/// A deploy job through the same job list: a PXE-booted VM with a disk
/// larger than the image claims it, writes the published image (signature,
/// manifest and every range checked), grows the root, reports and reboots;
/// the disk then boots by firmware alone, and over SSH its root fills the
/// larger disk.
fn deploy_onto_a_larger_disk(rig: &Rig, key: &Path) -> Identity {
    let job = rig.path("deploy.toml");
    let example = std::fs::read_to_string(repo_root().join("examples/jobs/deploy.toml")).unwrap();
    std::fs::write(&job, &example).unwrap();
    rig.master(&["add", &job.display().to_string()]).unwrap();

    let started = Instant::now();
    let (deployer, disk) = pxe_machine(rig, "deployer", DEPLOY_DISK_MIB, 1024);
    let v = wait_finished(rig, "deploy-debian", &deployer, true);
    assert_eq!(v.state, JobState::Done, "deploy-debian: {}", v.message);
    // The agent reboots into what it wrote: with -no-reboot, QEMU ends.
    wait_until(Duration::from_secs(120), "the deployer to reboot", || {
        Ok(deployer.exit_status()?.map(|_| ()))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("bench: deployed {} s", started.elapsed().as_secs());
    drop(deployer);

    // The master records which machine got which image.
    let shown = rig.master(&["show", "deploy-debian"]).unwrap();
    for want in ["deployer", "debian"] {
        assert!(
            shown.contains(want),
            "`show deploy-debian` lacks {want:?}:\n{shown}"
        );
    }

    let m = Machine::boot(rig, Firmware::Uefi, &disk, key);
    let took = m.wait_ssh();
    eprintln!("bench: ssh deployed {} s", took.as_secs());
    let id = check_machine(&m, Firmware::Uefi);
    // The root partition and its filesystem fill the larger disk.
    let disk_bytes: u64 = m.ssh("lsblk -bdno SIZE /dev/vda").parse().unwrap();
    assert_eq!(disk_bytes, DEPLOY_DISK_MIB << 20);
    let root_dev = m.ssh("findmnt -no SOURCE /");
    let part_bytes: u64 = m
        .ssh(&format!("lsblk -bdno SIZE {root_dev}"))
        .parse()
        .unwrap();
    let fs_bytes: u64 = m
        .ssh("df -B1 --output=size / | tail -n 1")
        .trim()
        .parse()
        .unwrap();
    assert!(
        part_bytes > disk_bytes - (100 << 20),
        "the root partition {root_dev} is {part_bytes} bytes on a {disk_bytes}-byte disk"
    );
    assert!(
        fs_bytes > (DISK_MIB << 20) + (DISK_MIB << 19),
        "the root filesystem is {fs_bytes} bytes; the image's disk was {} MiB, this one {DEPLOY_DISK_MIB} MiB",
        DISK_MIB
    );
    drop(m);

    // On the host: the GPT is whole, its backup header at the disk's end.
    let raw = rig.path("deployed.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(&disk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {} failed", disk.display());
    let out = Command::new("sfdisk")
        .arg("--verify")
        .arg(&raw)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("No errors detected"),
        "sfdisk --verify of the deployed disk: {said}"
    );
    std::fs::remove_file(&raw).unwrap();
    id
}
