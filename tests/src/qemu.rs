//! A builder for `qemu-system-x86_64` and the guard of a running VM.
//!
//! Software emulation (`-accel tcg`) by default; `KILN_QEMU_ACCEL=kvm`
//! overrides. The serial console goes to a log file that
//! [`Vm::wait_for_serial`] polls; QEMU runs in a process group killed when
//! the [`Vm`] drops, and a test that panics gets the serial log and QEMU's
//! own output on stderr.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procgroup::{ChildId, ProcessGroup};
use crate::wait::wait_until;

pub const QEMU: &str = "qemu-system-x86_64";
pub const QEMU_IMG: &str = "qemu-img";

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// `KILN_QEMU_ACCEL` (`tcg` or `kvm`), TCG when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("KILN_QEMU_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Ok(Self::Tcg),
            Ok("kvm") => Ok(Self::Kvm),
            Ok(other) => bail!("KILN_QEMU_ACCEL={other:?} is neither tcg nor kvm"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcg => "tcg",
            Self::Kvm => "kvm",
        }
    }
}

/// Disk image formats qemu-img makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// Fails the test, naming what to install, when QEMU or qemu-img is
/// missing: a test that cannot run its tools fails rather than passes.
pub fn require_qemu() {
    for tool in [QEMU, QEMU_IMG] {
        require_tool(tool, "qemu-system-x86 and qemu-utils");
    }
}

/// Fails the test when `tool --version` does not run, naming `packages`,
/// which scripts/install-deps.sh installs.
pub fn require_tool(tool: &str, packages: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is missing: scripts/install-deps.sh installs {packages}"
    );
}

/// For callers written as `if skip_without_qemu() { return; }`: fails the
/// test when QEMU is missing ([`require_qemu`]), never skips it.
pub fn skip_without_qemu() -> bool {
    require_qemu();
    false
}

/// Creates an empty disk image of `size_mib` MiB with qemu-img.
pub fn create_disk(path: &Path, size_mib: u64, format: DiskFormat) -> Result<()> {
    let out = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", format.name()])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .with_context(|| format!("running {QEMU_IMG} create for {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{QEMU_IMG} create {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Boot {
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
    /// PXE from the NIC's iPXE ROM, served by QEMU's TFTP.
    Pxe { tftp_dir: PathBuf, bootfile: String },
    /// Firmware boots the first disk.
    Disk,
}

#[derive(Debug, Clone)]
struct Drive {
    path: PathBuf,
    format: DiskFormat,
}

/// A QEMU command line under construction.
#[derive(Debug, Clone)]
pub struct Qemu {
    name: String,
    /// None: from `KILN_QEMU_ACCEL` when the command line is made.
    accel: Option<Accel>,
    memory_mib: u32,
    cpus: u32,
    boot: Boot,
    drives: Vec<Drive>,
    /// A user-network NIC without TFTP (PXE adds its own).
    user_net: bool,
    no_reboot: bool,
    extra: Vec<OsString>,
}

impl Qemu {
    /// A VM named `name` (used in logs): accelerator from `KILN_QEMU_ACCEL`
    /// (TCG when unset), 1024 MiB, 1 CPU, booting from disk.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            accel: None,
            memory_mib: 1024,
            cpus: 1,
            boot: Boot::Disk,
            drives: Vec::new(),
            user_net: false,
            no_reboot: true,
            extra: Vec::new(),
        }
    }

    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Direct kernel boot: `-kernel`, `-initrd`, `-append`.
    pub fn kernel(mut self, kernel: &Path, initrd: &Path, append: &str) -> Self {
        self.boot = Boot::Kernel {
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            append: append.to_owned(),
        };
        self
    }

    /// PXE boot through iPXE: a virtio NIC on QEMU's user network, whose
    /// DHCP hands out `bootfile` and whose TFTP serves `tftp_dir`.
    pub fn pxe(mut self, tftp_dir: &Path, bootfile: &str) -> Self {
        self.boot = Boot::Pxe {
            tftp_dir: tftp_dir.to_owned(),
            bootfile: bootfile.to_owned(),
        };
        self
    }

    /// A virtio disk; the format is qcow2 for `*.qcow2`, raw otherwise.
    pub fn disk(mut self, path: &Path) -> Self {
        let format = if path.extension().is_some_and(|e| e == "qcow2") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        self.drives.push(Drive {
            path: path.to_owned(),
            format,
        });
        self
    }

    /// A virtio NIC on QEMU's user network (the host is 10.0.2.2), for
    /// direct kernel boots that need the network. PXE boots have one already.
    pub fn user_net(mut self) -> Self {
        self.user_net = true;
        self
    }

    /// Whether a guest reboot ends QEMU (default true: a guest that panics
    /// or reboots ends the test run rather than looping).
    pub fn no_reboot(mut self, yes: bool) -> Self {
        self.no_reboot = yes;
        self
    }

    /// An extra raw QEMU argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The arguments after the program name; `serial_log` is where the
    /// serial console goes.
    pub fn args(&self, serial_log: &Path) -> Result<Vec<OsString>> {
        let accel = match self.accel {
            Some(a) => a,
            None => Accel::from_env()?,
        };
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-name");
        push(&self.name);
        push("-accel");
        push(accel.name());
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        push("-display");
        push("none");
        push("-monitor");
        push("none");
        push("-serial");
        push(&format!("file:{}", no_commas(serial_log)?));
        if self.no_reboot {
            push("-no-reboot");
        }
        for (i, d) in self.drives.iter().enumerate() {
            push("-drive");
            push(&format!(
                "file={},format={},if=none,id=disk{i}",
                no_commas(&d.path)?,
                d.format.name()
            ));
            push("-device");
            push(&format!("virtio-blk-pci,drive=disk{i},serial=kiln-disk{i}"));
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                push("-kernel");
                push(&no_commas(kernel)?);
                push("-initrd");
                push(&no_commas(initrd)?);
                push("-append");
                push(append);
            }
            Boot::Pxe { tftp_dir, bootfile } => {
                push("-netdev");
                push(&format!(
                    "user,id=pxe0,tftp={},bootfile={bootfile}",
                    no_commas(tftp_dir)?
                ));
                push("-device");
                push("virtio-net-pci,netdev=pxe0");
                push("-boot");
                push("n");
            }
            Boot::Disk => {
                push("-boot");
                push("c");
            }
        }
        if self.user_net {
            push("-netdev");
            push("user,id=net0");
            push("-device");
            push("virtio-net-pci,netdev=net0");
        } else if !matches!(self.boot, Boot::Pxe { .. }) {
            push("-nic");
            push("none");
        }
        a.extend(self.extra.iter().cloned());
        Ok(a)
    }

    /// Starts QEMU in a process group of its own. Logs go into a fresh
    /// temporary directory kept while the [`Vm`] lives.
    pub fn spawn(self) -> Result<Vm> {
        let group = Arc::new(Mutex::new(ProcessGroup::new()));
        self.spawn_in(&group)
    }

    /// Starts QEMU in `group`, shared with the test's other children.
    pub fn spawn_in(self, group: &Arc<Mutex<ProcessGroup>>) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-vm-{}-", self.name))
            .tempdir()
            .context("creating the VM's log directory")?;
        let serial = dir.path().join("serial.log");
        let qemu_log = dir.path().join("qemu.log");
        std::fs::write(&serial, b"").with_context(|| format!("creating {}", serial.display()))?;
        let log = std::fs::File::create(&qemu_log)
            .with_context(|| format!("creating {}", qemu_log.display()))?;
        let log2 = log
            .try_clone()
            .with_context(|| format!("opening {} twice", qemu_log.display()))?;
        let args = self.args(&serial)?;
        let mut cmd = Command::new(QEMU);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let id = lock(group).spawn(&format!("qemu {}", self.name), &mut cmd)?;
        Ok(Vm {
            name: self.name,
            group: Arc::clone(group),
            id,
            serial,
            qemu_log,
            args,
            _dir: dir,
        })
    }
}

fn lock(group: &Mutex<ProcessGroup>) -> std::sync::MutexGuard<'_, ProcessGroup> {
    group
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// QEMU's option syntax splits on commas; refuse paths that hold one.
fn no_commas(path: &Path) -> Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if s.contains(',') {
        bail!("{s} holds a comma, which QEMU's option syntax cannot take");
    }
    Ok(s.to_owned())
}

/// A running VM. Dropping it kills QEMU; when the thread is panicking (a
/// failed assertion) it first dumps the serial log and QEMU's output.
pub struct Vm {
    name: String,
    group: Arc<Mutex<ProcessGroup>>,
    id: ChildId,
    serial: PathBuf,
    qemu_log: PathBuf,
    args: Vec<OsString>,
    _dir: tempfile::TempDir,
}

/// How much of a log [`Vm`] dumps on failure.
const DUMP_TAIL: usize = 64 * 1024;

impl Vm {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        lock(&self.group).pid(self.id)
    }

    /// The serial log file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// The serial console output so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// QEMU's own stdout and stderr so far.
    pub fn qemu_output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.qemu_log).unwrap_or_default()).into_owned()
    }

    /// The command line QEMU was started with.
    pub fn command_line(&self) -> String {
        std::iter::once(QEMU.to_owned())
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// QEMU's exit status if it has exited.
    pub fn exit_status(&self) -> Result<Option<ExitStatus>> {
        lock(&self.group).exit_status(self.id)
    }

    /// Polls the serial log (and whether QEMU still runs) until `cond`
    /// returns a value. Fails when QEMU exits first or after `timeout`.
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        wait_until(
            timeout,
            &format!("{what} on {}'s console", self.name),
            || {
                // Read the log before checking the exit so that output written
                // just before QEMU exited is still seen.
                let serial = self.serial();
                if let Some(v) = cond(&serial) {
                    return Ok(Some(v));
                }
                if let Some(status) = self.exit_status()? {
                    if let Some(v) = cond(&self.serial()) {
                        return Ok(Some(v));
                    }
                    bail!(
                        "qemu {} exited ({status}) before {what} appeared on its console",
                        self.name
                    );
                }
                Ok(None)
            },
        )
    }

    /// Waits until the serial log contains `needle`; returns the log.
    pub fn wait_for_serial(&self, timeout: Duration, needle: &str) -> Result<String> {
        self.wait_until(timeout, &format!("{needle:?}"), |s| {
            s.contains(needle).then(|| s.to_owned())
        })
    }

    /// Waits until QEMU exits (the guest powered off, or rebooted with
    /// `no_reboot`).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        lock(&self.group).wait_exit(self.id, timeout)
    }

    /// Kills QEMU now.
    pub fn kill(&self) {
        lock(&self.group).kill_child(self.id);
    }

    /// Writes the logs to stderr, at most the last 64 KiB of each.
    pub fn dump_logs(&self) {
        let tail = |s: String| -> String {
            if s.len() <= DUMP_TAIL {
                return s;
            }
            let mut start = s.len() - DUMP_TAIL;
            while !s.is_char_boundary(start) {
                start += 1;
            }
            format!("[... {start} bytes cut ...]\n{}", &s[start..])
        };
        eprintln!("===== vm {}: {}", self.name, self.command_line());
        eprintln!("===== vm {}: serial console =====", self.name);
        eprintln!("{}", tail(self.serial()));
        eprintln!("===== vm {}: qemu output =====", self.name);
        eprintln!("{}", tail(self.qemu_output()));
        eprintln!("===== vm {}: end of logs =====", self.name);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(q: &Qemu) -> Vec<String> {
        q.args(Path::new("/tmp/s.log"))
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn direct_kernel_boot_command_line() {
        let q = Qemu::new("t")
            .accel(Accel::Tcg)
            .memory_mib(512)
            .cpus(2)
            .kernel(
                Path::new("/k/vmlinuz"),
                Path::new("/k/i.img"),
                "console=ttyS0",
            )
            .disk(Path::new("/d/a.qcow2"))
            .disk(Path::new("/d/b.img"));
        let a = strings(&q);
        assert!(has_pair(&a, "-accel", "tcg"));
        assert!(has_pair(&a, "-m", "512"));
        assert!(has_pair(&a, "-smp", "2"));
        assert!(has_pair(&a, "-serial", "file:/tmp/s.log"));
        assert!(has_pair(&a, "-kernel", "/k/vmlinuz"));
        assert!(has_pair(&a, "-initrd", "/k/i.img"));
        assert!(has_pair(&a, "-append", "console=ttyS0"));
        assert!(has_pair(
            &a,
            "-drive",
            "file=/d/a.qcow2,format=qcow2,if=none,id=disk0"
        ));
        assert!(has_pair(
            &a,
            "-drive",
            "file=/d/b.img,format=raw,if=none,id=disk1"
        ));
        assert!(has_pair(&a, "-nic", "none"));
        assert!(a.contains(&"-no-reboot".to_owned()));
    }

    #[test]
    fn pxe_command_line() {
        let a = strings(&Qemu::new("p").pxe(Path::new("/srv/tftp"), "boot.ipxe"));
        assert!(has_pair(
            &a,
            "-netdev",
            "user,id=pxe0,tftp=/srv/tftp,bootfile=boot.ipxe"
        ));
        assert!(has_pair(&a, "-device", "virtio-net-pci,netdev=pxe0"));
        assert!(has_pair(&a, "-boot", "n"));
        assert!(!a.contains(&"-nic".to_owned()));
    }

    #[test]
    fn commas_in_paths_are_refused() {
        let q = Qemu::new("c").disk(Path::new("/a,b.img"));
        let err = q.args(Path::new("/tmp/s.log")).unwrap_err();
        assert!(err.to_string().contains("/a,b.img"), "{err}");
    }

    #[test]
    fn accel_comes_from_the_environment_name() {
        assert_eq!(Accel::Kvm.name(), "kvm");
        assert_eq!(Accel::Tcg.name(), "tcg");
    }
}
