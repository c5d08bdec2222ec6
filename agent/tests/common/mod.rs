//! Helpers for the agent's tests: root and loop-device checks, running the
//! agent and system tools, loop devices on image files, payload tarballs.

#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const AGENT: &str = env!("CARGO_BIN_EXE_kiln-agent");

/// Checks that the test can run: a missing tool or privilege fails it with
/// the reason (scripts/install-deps.sh installs the tools), never skips it.
/// Returns true, for callers written as `if !can_run(..) { return; }`.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("{test}: needs root (loop devices, mounts)");
    }
    if !Path::new("/dev/loop-control").exists() {
        panic!("{test}: no /dev/loop-control");
    }
    for tool in [
        "mke2fs",
        "mkfs.vfat",
        "mkswap",
        "sfdisk",
        "e2fsck",
        "fsck.vfat",
        "blkid",
        "zstd",
        "losetup",
    ] {
        if !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
        {
            panic!("{test}: {tool} is not installed (scripts/install-deps.sh)");
        }
    }
    true
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device on part of a file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn new(file: &Path, offset: u64, size: Option<u64>) -> Loop {
        let mut c = Command::new("losetup");
        c.args(["-f", "--show", "-o", &offset.to_string()]);
        if let Some(s) = size {
            c.args(["--sizelimit", &s.to_string()]);
        }
        Loop(ok(c.arg(file)).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Partitions the kernel was told of (a deploy's grow adds them with
        // BLKPG on a loop device that does not scan) outlive the detach
        // and would stand in the way of the next user of the device.
        let _ = Command::new("partx")
            .args(["-d", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount, unmounted on drop.
pub struct Mounted(pub PathBuf);

impl Mounted {
    pub fn new(dev: &str, at: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        ok(Command::new("mount").args(["-o", opts, dev]).arg(at));
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Partition table of a disk image, as sfdisk sees it.
pub fn sfdisk_json(disk: &Path) -> Option<serde_json::Value> {
    let out = run(Command::new("sfdisk").arg("--json").arg(disk));
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// True when the disk has no partition table left: the first 34 and last
/// 33 sectors are zero and sfdisk finds nothing.
pub fn table_wiped(disk: &Path) -> bool {
    let data = std::fs::read(disk).unwrap();
    let head = data[..34 * 512].iter().all(|&b| b == 0);
    let tail = data[data.len() - 33 * 512..].iter().all(|&b| b == 0);
    head && tail && sfdisk_json(disk).is_none()
}

/// Runs `kiln-agent build` with a job text in `dir`.
pub fn build(dir: &Path, job: &str, disk_size: &str) -> Output {
    std::fs::write(dir.join("job.toml"), job).unwrap();
    let disk = dir.join("disk.img");
    let _ = std::fs::remove_file(&disk);
    run(Command::new(AGENT)
        .arg("build")
        .arg("--job")
        .arg(dir.join("job.toml"))
        .arg("--payloads")
        .arg(dir.join("payloads"))
        .arg("--disk")
        .arg(&disk)
        .args(["--disk-size", disk_size])
        .arg("--out")
        .arg(dir.join("image.raw.zst"))
        .arg("--work-dir")
        .arg(dir))
}

pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// A tar header for a plain entry.
pub fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// The phases of `kiln-agent build`, in order, as its manifest lists them.
pub const BUILD_PHASES: [&str; 9] = [
    "check",
    "partition",
    "mkfs",
    "mount",
    "payloads",
    "configure",
    "steps",
    "unmount",
    "capture",
];

/// Checks the agent's part of a `kiln-agent run` build's manifest: its
/// version, the machine (CPUs, memory, a disk of `disk_size` bytes), and
/// every phase from download to upload, in order, each started within the
/// build.
pub fn assert_run_provenance(m: &kiln_spool::manifest::ImageManifest, disk_size: u64) {
    let p = m.provenance.as_ref().expect("the manifest has provenance");
    assert_eq!(p.kiln_version, env!("CARGO_PKG_VERSION"));
    assert!(p.hardware.cpus > 0, "{p:?}");
    assert!(p.hardware.memory_bytes > 0, "{p:?}");
    assert_eq!(p.hardware.disk_size, disk_size, "{p:?}");
    let names: Vec<&str> = m.phases.iter().map(|p| p.name.as_str()).collect();
    let want: Vec<&str> = std::iter::once("download")
        .chain(BUILD_PHASES)
        .chain(["upload"])
        .collect();
    assert_eq!(names, want);
    for ph in &m.phases {
        let started = ph
            .started
            .unwrap_or_else(|| panic!("phase {} has no start", ph.name));
        assert!(
            m.started <= started && started <= m.finished,
            "{ph:?} outside {}..{}",
            m.started,
            m.finished
        );
    }
}
