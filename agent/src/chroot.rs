//! The mounted target as a system its own tools can run in: /proc, /sys,
//! a /dev of its own (the build machine has no udev, so the agent makes the
//! nodes and the /dev/disk/by-uuid, by-partuuid and by-label links for the
//! target's partitions), /dev/pts, /dev/shm, /run as tmpfs, and the agent's
//! resolv.conf while it is entered. Every mount is a guard undone on drop,
//! lazily if busy; processes left running in the target are killed first.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_spool::job::{PartKind, Table};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::disk::mkfs::FsId;
use crate::disk::plan::DiskPlan;
use crate::error::{Context, Error, Result};
use crate::joblog::JobLog;
use crate::tree::Tree;

/// The disk the target lives on, as the target's tools should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDisk {
    /// The whole disk (`/dev/vda`, `/dev/loop0`).
    pub disk: PathBuf,
    pub partitions: Vec<TargetPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPartition {
    pub node: PathBuf,
    pub kind: PartKind,
    pub mount: Option<String>,
    /// Filesystem UUID (`XXXX-XXXX` for vfat), when a filesystem was made.
    pub fs_uuid: Option<String>,
    /// Filesystem label, when a filesystem was made.
    pub fs_label: Option<String>,
    /// GPT partition GUID, or `SIGNATURE-NN` for MBR, as udev names it.
    pub part_uuid: Option<String>,
}

impl TargetDisk {
    /// Describes the partitioned disk; partition UUIDs are read back from
    /// its table (a missing one only loses its by-partuuid link).
    pub fn new(
        disk: &Path,
        plan: &DiskPlan,
        nodes: &[PathBuf],
        ids: &[Option<FsId>],
        log: &JobLog,
    ) -> TargetDisk {
        let part_uuids = read_part_uuids(disk, plan).unwrap_or_else(|e| {
            log.line(&format!(
                "no by-partuuid links: reading the partition table: {}",
                e.one_line()
            ));
            Vec::new()
        });
        let partitions = plan
            .partitions
            .iter()
            .zip(nodes)
            .zip(ids)
            .map(|((p, node), id)| TargetPartition {
                node: node.clone(),
                kind: p.kind,
                mount: p.mount.clone(),
                fs_uuid: id.as_ref().map(|id| id.uuid.clone()),
                fs_label: id.as_ref().map(|_| p.label.clone()),
                part_uuid: part_uuids
                    .iter()
                    .find(|(n, _)| *n == p.number)
                    .map(|(_, u)| u.clone()),
            })
            .collect();
        TargetDisk {
            disk: disk.to_path_buf(),
            partitions,
        }
    }

    /// The partition mounted at `/`.
    pub fn root(&self) -> Option<&TargetPartition> {
        self.partitions
            .iter()
            .find(|p| p.mount.as_deref() == Some("/"))
    }

    /// What target steps find in their environment: `KILN_DISK` and
    /// `KILN_ROOT_DEVICE`.
    pub fn step_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("KILN_DISK".into(), self.disk.display().to_string())];
        if let Some(r) = self.root() {
            env.push(("KILN_ROOT_DEVICE".into(), r.node.display().to_string()));
        }
        env
    }
}

fn read_part_uuids(disk: &Path, plan: &DiskPlan) -> Result<Vec<(u32, String)>> {
    match plan.table {
        Table::Gpt => {
            let lb = if plan.sector_size == 4096 {
                gpt::disk::LogicalBlockSize::Lb4096
            } else {
                gpt::disk::LogicalBlockSize::Lb512
            };
            let g = gpt::GptConfig::new()
                .writable(false)
                .logical_block_size(lb)
                .open(disk)
                .map_err(|e| {
                    Error::Failed(format!("reading the GPT of {}: {e}", disk.display()))
                })?;
            Ok(g.partitions()
                .iter()
                .map(|(n, p)| (*n, p.part_guid.hyphenated().to_string()))
                .collect())
        }
        Table::Mbr => {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(disk).ctx(|| format!("opening {}", disk.display()))?;
            let mut sig = [0u8; 4];
            f.seek(SeekFrom::Start(440))
                .and_then(|_| f.read_exact(&mut sig))
                .ctx(|| format!("reading the MBR signature of {}", disk.display()))?;
            let sig = u32::from_le_bytes(sig);
            Ok(plan
                .partitions
                .iter()
                .map(|p| (p.number, mbr_part_uuid(sig, p.number)))
                .collect())
        }
    }
}

/// udev's PARTUUID of an MBR partition: the disk signature and the number.
pub fn mbr_part_uuid(signature: u32, number: u32) -> String {
    format!("{signature:08x}-{number:02x}")
}

/// A mount made for the chroot; unmounted on drop, lazily if still busy.
struct ChrootMount {
    target: PathBuf,
}

impl ChrootMount {
    fn new(source: &str, target: &Path, fstype: &str, data: Option<&str>) -> Result<ChrootMount> {
        mount(Some(source), target, Some(fstype), MsFlags::MS_NOSUID, data)
            .ctx(|| format!("mounting {fstype} on {}", target.display()))?;
        Ok(ChrootMount {
            target: target.to_path_buf(),
        })
    }

    fn unmount(mut self) -> Result<()> {
        let r = self.unmount_inner();
        std::mem::forget(self);
        r
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let mut last = Ok(());
        for _ in 0..25 {
            last = umount2(&self.target, MntFlags::empty());
            match last {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(40)),
                Err(_) => break,
            }
        }
        // Leave nothing mounted behind: a lazy unmount detaches it now.
        let lazy = umount2(&self.target, MntFlags::MNT_DETACH);
        last.or(lazy)
            .ctx(|| format!("unmounting {}", self.target.display()))
    }
}

impl Drop for ChrootMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!("kiln-agent: {}", e.one_line());
        }
    }
}

const SAVED_RESOLV: &str = ".kiln-saved-resolv.conf";

/// The target's own resolv.conf, set aside while the agent's is in place.
struct ResolvSwap {
    etc: Tree,
    /// Whether the target had an entry (file or symlink) that was set aside.
    saved: bool,
}

impl ResolvSwap {
    fn put(root: &Path, agent_resolv: &[u8]) -> Result<ResolvSwap> {
        let tree = Tree::open(root).ctx(|| format!("opening {}", root.display()))?;
        let etc_fd = tree
            .dir(Path::new("etc"))
            .map_err(|e| Error::Failed(format!("resolv.conf: {e}")))?;
        let etc = Tree::from_fd(etc_fd, root.join("etc"));
        let saved = renameat(&etc, "resolv.conf", SAVED_RESOLV)?;
        etc.write_file(Path::new("resolv.conf"), agent_resolv, 0o644, 0, 0)
            .map_err(|e| Error::Failed(format!("resolv.conf: {e}")))?;
        Ok(ResolvSwap { etc, saved })
    }

    fn restore(self) -> Result<()> {
        let slot = self
            .etc
            .slot(Path::new("resolv.conf"))
            .map_err(|e| Error::Failed(format!("resolv.conf: {e}")))?;
        slot.remove_non_dir()
            .ctx(|| "removing the agent's resolv.conf from the target".into())?;
        if self.saved {
            renameat(&self.etc, SAVED_RESOLV, "resolv.conf")?;
        }
        Ok(())
    }
}

/// Renames `from` to `to` in `dir`; false when `from` does not exist.
fn renameat(dir: &Tree, from: &str, to: &str) -> Result<bool> {
    let fd = dir
        .dir(Path::new("."))
        .map_err(|e| Error::Failed(format!("opening {}: {e}", dir.display().display())))?;
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: renameat with a valid dirfd and NUL-terminated names.
    let r = unsafe { libc::renameat(fd.as_raw_fd(), f.as_ptr(), fd.as_raw_fd(), t.as_ptr()) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        return Ok(false);
    }
    Err(e).ctx(|| format!("renaming {from} to {to} in {}", dir.display().display()))
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// The target, entered: pseudo filesystems mounted, /dev populated.
pub struct Chroot {
    root: PathBuf,
    env: Vec<(String, String)>,
    // Unmounted in reverse order of mounting.
    mounts: Vec<ChrootMount>,
    resolv: Option<ResolvSwap>,
}

/// Character devices every chroot gets: name, major, minor, mode.
const CHAR_NODES: [(&str, u64, u64, u32); 6] = [
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
];

const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

impl Chroot {
    /// Mounts the pseudo filesystems into the target at `root` and makes
    /// its /dev for `disk`.
    pub fn enter(root: &Path, disk: &TargetDisk, log: &JobLog) -> Result<Chroot> {
        // Mounts below the target stay the agent's own: none propagates to
        // a peer of the target's mount.
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("making the mounts under {} private", root.display()))?;
        let mut c = Chroot {
            root: root.to_path_buf(),
            env: disk.step_env(),
            mounts: Vec::new(),
            resolv: None,
        };
        let tree = Tree::open(root).ctx(|| format!("opening {}", root.display()))?;
        for (dir, fstype, data) in [
            ("proc", "proc", None),
            ("sys", "sysfs", None),
            ("dev", "tmpfs", Some("mode=0755,size=1m")),
            ("run", "tmpfs", Some("mode=0755")),
        ] {
            let at = mount_point(&tree, root, dir)?;
            c.mounts.push(ChrootMount::new(dir, &at, fstype, data)?);
        }
        let dev = root.join("dev");
        populate_dev(&dev, disk)?;
        for (dir, fstype, data) in [
            (
                "pts",
                "devpts",
                Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
            ),
            ("shm", "tmpfs", Some("mode=1777")),
        ] {
            let at = dev.join(dir);
            std::fs::create_dir(&at).ctx(|| format!("creating {}", at.display()))?;
            c.mounts.push(ChrootMount::new(dir, &at, fstype, data)?);
        }
        match std::fs::read("/etc/resolv.conf") {
            Ok(text) => c.resolv = Some(ResolvSwap::put(root, &text)?),
            Err(_) => log.line("the agent has no /etc/resolv.conf: the target keeps its own"),
        }
        Ok(c)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `KILN_DISK` and `KILN_ROOT_DEVICE` for commands run inside.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Kills whatever still runs inside, restores resolv.conf and unmounts
    /// everything, reporting the first failure (drop only logs).
    pub fn leave(mut self) -> Result<()> {
        self.leave_inner()
    }

    fn leave_inner(&mut self) -> Result<()> {
        kill_processes_in(&self.root);
        let mut first = self.resolv.take().and_then(|r| r.restore().err());
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.unmount() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if let Err(e) = self.leave_inner() {
            eprintln!("kiln-agent: leaving the target: {}", e.one_line());
        }
    }
}

/// A directory `name` directly under the root, made if missing, that is a
/// directory and not a symlink, so that a mount on it stays in the target.
fn mount_point(tree: &Tree, root: &Path, name: &str) -> Result<PathBuf> {
    tree.dir(Path::new(name))
        .map_err(|e| Error::Failed(format!("mount point /{name}: {e}")))?;
    let at = root.join(name);
    let meta = std::fs::symlink_metadata(&at).ctx(|| format!("inspecting {}", at.display()))?;
    if !meta.is_dir() {
        return Err(Error::Failed(format!(
            "/{name} in the target is not a directory (a symlink?); it cannot be a mount point"
        )));
    }
    Ok(at)
}

/// Fills a fresh tmpfs /dev: the usual character devices, the disk and its
/// partitions under their own names, and udev's /dev/disk links.
fn populate_dev(dev: &Path, disk: &TargetDisk) -> Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    for (name, major, minor, mode) in CHAR_NODES {
        let at = dev.join(name);
        mknod(
            &at,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(major, minor),
        )
        .ctx(|| format!("making {}", at.display()))?;
        // mknod is subject to the umask.
        std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .ctx(|| format!("setting the mode of {}", at.display()))?;
    }
    for (name, to) in DEV_LINKS {
        std::os::unix::fs::symlink(to, dev.join(name))
            .ctx(|| format!("linking {}/{name}", dev.display()))?;
    }
    let mut nodes = vec![disk.disk.as_path()];
    nodes.extend(disk.partitions.iter().map(|p| p.node.as_path()));
    for node in nodes {
        let meta = std::fs::metadata(node).ctx(|| format!("inspecting {}", node.display()))?;
        if !meta.file_type().is_block_device() {
            return Err(Error::Failed(format!(
                "{} is not a block device",
                node.display()
            )));
        }
        let at = dev.join(dev_name(node)?);
        mknod(
            &at,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            meta.rdev(),
        )
        .ctx(|| format!("making {}", at.display()))?;
    }
    for (dir, pick) in [
        (
            "by-uuid",
            (|p: &TargetPartition| p.fs_uuid.clone()) as fn(&TargetPartition) -> Option<String>,
        ),
        ("by-partuuid", |p| p.part_uuid.clone()),
        ("by-label", |p| p.fs_label.clone()),
    ] {
        let d = dev.join("disk").join(dir);
        std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        for p in &disk.partitions {
            let Some(name) = pick(p) else { continue };
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                continue;
            }
            let to = Path::new("../..").join(dev_name(&p.node)?);
            // Two filesystems labelled alike: udev keeps one link as well.
            let _ = std::os::unix::fs::symlink(&to, d.join(&name));
        }
    }
    Ok(())
}

/// Where a node of the agent's /dev goes in the target's: the same path
/// below /dev (`/dev/vda2` -> `vda2`, `/dev/mapper/x` -> `mapper/x` is not
/// used by the agent), else its file name.
fn dev_name(node: &Path) -> Result<PathBuf> {
    let name = node
        .strip_prefix("/dev")
        .ok()
        .filter(|rest| rest.components().count() == 1)
        .map(Path::to_path_buf)
        .or_else(|| node.file_name().map(PathBuf::from));
    name.ok_or_else(|| Error::Failed(format!("{} has no device name", node.display())))
}

/// Kills every process whose root directory is the target: daemons a step
/// or a package script left running would hold the target's mounts and the
/// step's output pipes.
pub fn kill_processes_in(root: &Path) {
    let Ok(root) = std::fs::canonicalize(root) else {
        return;
    };
    let me = std::process::id();
    for _ in 0..3 {
        let mut killed = 0;
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            let Ok(link) = std::fs::read_link(entry.path().join("root")) else {
                continue;
            };
            if link.as_os_str().as_bytes() == root.as_os_str().as_bytes() || link.starts_with(&root)
            {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
        if killed == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mounted target and its disk, entered as a chroot on first need and
/// left once (or on drop).
pub struct Target {
    root: PathBuf,
    disk: TargetDisk,
    chroot: Option<Chroot>,
}

impl Target {
    pub fn new(root: &Path, disk: TargetDisk) -> Target {
        Target {
            root: root.to_path_buf(),
            disk,
            chroot: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn disk(&self) -> &TargetDisk {
        &self.disk
    }

    /// The target's files, resolved beneath its root.
    pub fn tree(&self) -> Result<Tree> {
        Tree::open(&self.root).ctx(|| format!("opening {}", self.root.display()))
    }

    /// The entered target, entering it on first use.
    pub fn enter(&mut self, log: &JobLog) -> Result<&Chroot> {
        if self.chroot.is_none() {
            self.chroot = Some(Chroot::enter(&self.root, &self.disk, log)?);
        }
        self.chroot
            .as_ref()
            .ok_or_else(|| Error::Failed("the target was not entered".into()))
    }

    /// The entered target, if it is.
    pub fn entered(&self) -> Option<&Chroot> {
        self.chroot.as_ref()
    }

    /// Leaves the chroot if entered, reporting a failure to undo it.
    pub fn leave(&mut self) -> Result<()> {
        self.chroot.take().map_or(Ok(()), Chroot::leave)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_partuuids_are_named_as_udev_names_them() {
        assert_eq!(mbr_part_uuid(0x1234abcd, 1), "1234abcd-01");
        assert_eq!(mbr_part_uuid(0x00000001, 12), "00000001-0c");
    }

    #[test]
    fn device_names_keep_their_place_under_dev() {
        assert_eq!(
            dev_name(Path::new("/dev/vda2")).unwrap(),
            PathBuf::from("vda2")
        );
        assert_eq!(
            dev_name(Path::new("/dev/loop0p1")).unwrap(),
            PathBuf::from("loop0p1")
        );
        assert_eq!(
            dev_name(Path::new("/tmp/x/nvme0n1p1")).unwrap(),
            PathBuf::from("nvme0n1p1")
        );
    }
}
