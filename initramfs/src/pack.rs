//! Assembles the initramfs from a [`Spec`]: the agent as `/init`, kernel
//! modules with their index files, tools with their libraries, busybox, the
//! agent config, and compresses the cpio.
//!
//! Layout inside the image:
//!
//! | path | what |
//! | --- | --- |
//! | `/init` | the agent (mode 0755) |
//! | `/etc/kiln/agent.toml` | the agent config (mode 0600) |
//! | `/lib/modules/<ver>/kernel/**.ko` | plain (decompressed) modules |
//! | `/lib/modules/<ver>/modules.{dep,alias,softdep,builtin}` | depmod formats |
//! | `/sbin/{mke2fs,mkfs.vfat,mkswap,e2fsck,resize2fs}` | tools; libraries at the paths the loader opens |
//! | `/bin/busybox`, `/bin/<applet>` | busybox and its applet links; `/sbin/modprobe` too |
//! | `/etc/udhcpc/default.script` | configures address, route and DNS from a lease (also linked from `/usr/share/udhcpc/`) |
//! | `/dev/console`, `/dev/null` | nodes the kernel and early init need |
//! | `/proc /sys /dev /run /tmp /mnt /root` | empty mount points |

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{Compression, Spec};
use crate::cpio::{Archive, ArchiveError};
use crate::elf::{self, ElfError};
use crate::modules::{ModuleError, ModuleTree};

/// Why an initramfs could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("compressing the cpio with {0}")]
    Compress(Compression, #[source] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Elf(#[from] ElfError),
}

/// Busybox applets linked into `/bin`: the udhcpc client, module tools and
/// a rescue shell's worth of commands.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "awk",
    "blkid",
    "blockdev",
    "cat",
    "chmod",
    "chroot",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "dmesg",
    "du",
    "echo",
    "env",
    "fdisk",
    "find",
    "free",
    "grep",
    "gunzip",
    "gzip",
    "halt",
    "head",
    "hexdump",
    "hostname",
    "ifconfig",
    "insmod",
    "ip",
    "kill",
    "less",
    "ln",
    "losetup",
    "ls",
    "lsmod",
    "mkdir",
    "mknod",
    "modinfo",
    "modprobe",
    "more",
    "mount",
    "mv",
    "nc",
    "ping",
    "poweroff",
    "ps",
    "readlink",
    "reboot",
    "rm",
    "rmdir",
    "rmmod",
    "route",
    "sed",
    "seq",
    "sleep",
    "sort",
    "stat",
    "switch_root",
    "sync",
    "tail",
    "tar",
    "tee",
    "test",
    "top",
    "touch",
    "tr",
    "udhcpc",
    "umount",
    "uname",
    "vi",
    "wc",
    "wget",
    "xxd",
    "zcat",
];

/// Where the udhcpc event script lives (`udhcpc -s` takes it explicitly).
pub const UDHCPC_SCRIPT_PATH: &str = "etc/udhcpc/default.script";

/// The udhcpc event script: sets the address, default route and resolvers
/// from a lease with busybox `ip`.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# udhcpc event script: applies a DHCP lease to $interface.
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound|renew)
	ip -4 addr flush dev "$interface"
	ip -4 addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
	ip link set "$interface" up
	if [ -n "$router" ]; then
		while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
		for r in $router; do
			ip -4 route add default via "$r" dev "$interface" && break
		done
	fi
	: > /etc/resolv.conf
	[ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
	for d in $dns; do
		echo "nameserver $d" >> /etc/resolv.conf
	done
	;;
esac
exit 0
"#;

const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "mnt", "root"];
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// One line of the pack report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub what: &'static str,
    pub files: usize,
    pub bytes: u64,
}

/// What was packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kernel_version: String,
    pub sections: Vec<Section>,
    /// Module names in load order.
    pub modules: Vec<String>,
    /// Requested names that are built into the kernel (nothing to pack).
    pub builtin: Vec<String>,
    pub entries: usize,
    pub cpio_bytes: u64,
    pub compressed_bytes: u64,
    pub compression: Compression,
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel modules for {}", self.kernel_version)?;
        for s in &self.sections {
            writeln!(
                f,
                "  {:<10} {:>4} files  {:>11}",
                s.what,
                s.files,
                mib(s.bytes)
            )?;
        }
        if !self.builtin.is_empty() {
            writeln!(f, "  builtin (not packed): {}", self.builtin.join(", "))?;
        }
        writeln!(
            f,
            "  total      {:>4} entries {:>11} cpio, {} {}",
            self.entries,
            mib(self.cpio_bytes),
            mib(self.compressed_bytes),
            self.compression
        )
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PackError> {
    std::fs::read(path).map_err(|source| PackError::Read {
        path: path.to_owned(),
        source,
    })
}

fn find_tool(name: &str) -> Result<PathBuf, PackError> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PackError::Invalid(format!("tool {name} does not exist")))
        };
    }
    TOOL_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            PackError::Invalid(format!(
                "tool {name} is in none of {} (scripts/install-deps.sh installs e2fsprogs, dosfstools, util-linux)",
                TOOL_DIRS.join(", ")
            ))
        })
}

/// Builds the archive for `spec` and a report without the compressed size.
pub fn build(spec: &Spec) -> Result<(Archive, Report), PackError> {
    let mut a = Archive::new();
    let mut sections = Vec::new();

    for dir in MOUNT_POINTS {
        a.dir(dir)?;
    }
    a.char_dev("dev/console", 5, 1, 0o600)?;
    a.char_dev("dev/null", 1, 3, 0o666)?;

    let agent = read(&spec.agent)?;
    sections.push(Section {
        what: "init",
        files: 1,
        bytes: agent.len() as u64,
    });
    a.file("init", agent, 0o755)?;

    if let Some(cfg) = &spec.agent_config {
        let data = read(cfg)?;
        sections.push(Section {
            what: "config",
            files: 1,
            bytes: data.len() as u64,
        });
        a.file("etc/kiln/agent.toml", data, 0o600)?;
    }

    // Modules.
    let mut tree = ModuleTree::open(&spec.kernel_modules)?;
    let set = tree.select(&spec.modules)?;
    let base = format!("lib/modules/{}", set.version);
    let index = [
        ("modules.dep", set.modules_dep()),
        ("modules.alias", set.modules_alias()),
        ("modules.softdep", set.modules_softdep()),
    ];
    let mut index_bytes = 0u64;
    for (name, text) in index {
        index_bytes += text.len() as u64;
        a.file(&format!("{base}/{name}"), text.into_bytes(), 0o644)?;
    }
    if let Some(builtin) = &set.builtin_list {
        index_bytes += builtin.len() as u64;
        a.file(
            &format!("{base}/modules.builtin"),
            builtin.clone().into_bytes(),
            0o644,
        )?;
    }
    sections.push(Section {
        what: "modules",
        files: set.modules.len(),
        bytes: set.bytes() + index_bytes,
    });
    let module_names: Vec<String> = set.modules.iter().map(|m| m.name.clone()).collect();
    for m in set.modules {
        a.file(&format!("{base}/{}", m.rel_path), m.data, 0o644)?;
    }

    // Tools and their libraries.
    let mut tool_paths = Vec::new();
    let mut tool_bytes = 0u64;
    for name in &spec.tools {
        let host = find_tool(name)?;
        let file_name = Path::new(name)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.clone());
        let data = read(&host)?;
        tool_bytes += data.len() as u64;
        a.file(&format!("sbin/{file_name}"), data, 0o755)?;
        tool_paths.push(host);
    }
    let libs = elf::closure(&tool_paths)?;
    let mut lib_bytes = 0u64;
    for (dest, host) in &libs {
        let data = read(host)?;
        lib_bytes += data.len() as u64;
        a.file(dest, data, 0o755)?;
    }
    if Path::new("/etc/mke2fs.conf").is_file() && spec.tools.iter().any(|t| t.ends_with("mke2fs")) {
        a.file(
            "etc/mke2fs.conf",
            read(Path::new("/etc/mke2fs.conf"))?,
            0o644,
        )?;
    }
    sections.push(Section {
        what: "tools",
        files: spec.tools.len(),
        bytes: tool_bytes,
    });
    sections.push(Section {
        what: "libraries",
        files: libs.len(),
        bytes: lib_bytes,
    });

    // Busybox.
    let busybox = read(&spec.busybox)?;
    let link = elf::linking(&busybox).map_err(|problem| {
        PackError::Invalid(format!(
            "{}: not an ELF file: {problem}",
            spec.busybox.display()
        ))
    })?;
    if link.interpreter.is_some() || !link.needed.is_empty() {
        return Err(PackError::Invalid(format!(
            "{} is dynamically linked; a static busybox is needed (Debian's busybox-static)",
            spec.busybox.display()
        )));
    }
    sections.push(Section {
        what: "busybox",
        files: 1,
        bytes: busybox.len() as u64,
    });
    a.file("bin/busybox", busybox, 0o755)?;
    for applet in BUSYBOX_APPLETS {
        let path = format!("bin/{applet}");
        if !a.contains(&path) {
            a.symlink(&path, "busybox")?;
        }
    }
    // The kernel's request_module() runs /sbin/modprobe.
    if !a.contains("sbin/modprobe") {
        a.symlink("sbin/modprobe", "../bin/busybox")?;
    }
    // Debian's busybox looks for the script in /etc, upstream's in /usr/share.
    a.file(UDHCPC_SCRIPT_PATH, UDHCPC_SCRIPT.as_bytes().to_vec(), 0o755)?;
    a.symlink(
        "usr/share/udhcpc/default.script",
        &format!("/{UDHCPC_SCRIPT_PATH}"),
    )?;

    let mut extra_bytes = 0u64;
    for f in &spec.files {
        let data = read(&f.src)?;
        extra_bytes += data.len() as u64;
        a.file(&f.dest, data, f.mode & 0o7777)?;
    }
    if !spec.files.is_empty() {
        sections.push(Section {
            what: "extra",
            files: spec.files.len(),
            bytes: extra_bytes,
        });
    }

    let report = Report {
        kernel_version: set.version,
        sections,
        modules: module_names,
        builtin: set.builtin,
        entries: a.len(),
        cpio_bytes: 0,
        compressed_bytes: 0,
        compression: spec.compress,
    };
    Ok((a, report))
}

/// zstd level for images: near level 19 in size at a twentieth of its time.
const ZSTD_LEVEL: i32 = 9;

/// Compresses cpio bytes: zstd level 9 or gzip level 6, both deterministic
/// (single-threaded zstd; gzip with mtime 0 and no file name).
pub fn compress(cpio: &[u8], how: Compression) -> Result<Vec<u8>, PackError> {
    match how {
        Compression::Zstd => {
            zstd::stream::encode_all(cpio, ZSTD_LEVEL).map_err(|e| PackError::Compress(how, e))
        }
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::default());
            enc.write_all(cpio)
                .and_then(|_| enc.finish())
                .map_err(|e| PackError::Compress(how, e))
        }
    }
}

/// Packs `spec` into the compressed image at `out` (written to a temporary
/// file beside it, synced, then renamed) and reports what it holds.
pub fn write_image(spec: &Spec, out: &Path) -> Result<Report, PackError> {
    let (archive, mut report) = build(spec)?;
    let cpio = archive.to_newc().map_err(|source| PackError::Write {
        path: out.to_owned(),
        source,
    })?;
    let image = compress(&cpio, spec.compress)?;
    report.cpio_bytes = cpio.len() as u64;
    report.compressed_bytes = image.len() as u64;

    let tmp = out.with_extension("tmp");
    let write = |path: &Path| -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&image)?;
        f.sync_all()
    };
    write(&tmp)
        .and_then(|_| std::fs::rename(&tmp, out))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            PackError::Write {
                path: out.to_owned(),
                source,
            }
        })?;
    Ok(report)
}
