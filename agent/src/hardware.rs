//! The machine as the agent sees it, for an image's provenance and a deploy
//! report: DMI vendor and product, CPU model and count, memory, the disk's
//! model and size, and the NICs' MAC addresses.
//!
//! Nothing here fails: a piece the kernel does not expose (no DMI in a
//! container, no model for a virtio disk) is left empty. Every string is
//! cut to [`MAX_HARDWARE_FIELD`] bytes of printable ASCII, since firmware
//! strings are whatever the vendor burnt in.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use kiln_spool::manifest::{Hardware, Nic, MAX_HARDWARE_FIELD, MAX_NICS};

/// Where the kernel's views are mounted; a test points them at fixtures.
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// The running machine, with `disk` (a block device or an image file) as
/// its disk.
pub fn summary(disk: &Path) -> Hardware {
    summary_at(&Roots::default(), disk)
}

/// [`summary`] with the kernel's views under `roots`.
pub fn summary_at(roots: &Roots, disk: &Path) -> Hardware {
    let dmi = roots.sys.join("class/dmi/id");
    let cpuinfo = read_small(&roots.proc.join("cpuinfo")).unwrap_or_default();
    let meminfo = read_small(&roots.proc.join("meminfo")).unwrap_or_default();
    let cpus = read_small(&roots.sys.join("devices/system/cpu/online"))
        .and_then(|s| parse_cpu_list(&s))
        .or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .map(|n| n.get() as u32)
        })
        .unwrap_or(0);
    let (disk_model, disk_size) = disk_info(roots, disk);
    Hardware {
        vendor: clean(&read_small(&dmi.join("sys_vendor")).unwrap_or_default()),
        product: clean(&read_small(&dmi.join("product_name")).unwrap_or_default()),
        cpu_model: clean(&parse_cpu_model(&cpuinfo)),
        cpus,
        memory_bytes: parse_mem_total(&meminfo).unwrap_or(0),
        disk_model,
        disk_size,
        nics: nics(&roots.sys.join("class/net")),
    }
}

/// A pseudo file's text, at most 1 MiB of it (`/proc/cpuinfo` on a large
/// machine is some hundred KiB).
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Printable ASCII, blanks folded, at most [`MAX_HARDWARE_FIELD`] bytes.
pub fn clean(s: &str) -> String {
    let mut out = String::new();
    for word in s.split_whitespace() {
        let word: String = word
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        let sep = usize::from(!out.is_empty());
        if out.len() + sep + word.len() > MAX_HARDWARE_FIELD {
            let room = MAX_HARDWARE_FIELD.saturating_sub(out.len() + sep);
            if room > 0 {
                if sep == 1 {
                    out.push(' ');
                }
                out.push_str(&word[..room]);
            }
            break;
        }
        if sep == 1 {
            out.push(' ');
        }
        out.push_str(&word);
    }
    out
}

/// The first `model name` in `/proc/cpuinfo` (x86), else the first
/// `Model`, `cpu model` or `Processor` line (ARM, MIPS).
pub fn parse_cpu_model(cpuinfo: &str) -> String {
    for key in ["model name", "Model", "cpu model", "Processor"] {
        for line in cpuinfo.lines() {
            if let Some((k, v)) = line.split_once(':') {
                if k.trim() == key && !v.trim().is_empty() {
                    return v.trim().to_string();
                }
            }
        }
    }
    String::new()
}

/// `MemTotal:  16310084 kB` in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// How many CPUs a kernel CPU list names (`0-3,6,8-9` is 7).
pub fn parse_cpu_list(list: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        n = n.checked_add(count)?;
    }
    (n > 0).then_some(n)
}

/// The disk's model and size. A block device is looked up in
/// `/sys/class/block` (a partition's model is its disk's); an image file
/// has its length and no model.
fn disk_info(roots: &Roots, disk: &Path) -> (String, u64) {
    let Ok(meta) = std::fs::metadata(disk) else {
        return (String::new(), 0);
    };
    if !meta.file_type().is_block_device() {
        return (String::new(), if meta.is_file() { meta.len() } else { 0 });
    }
    let name = std::fs::canonicalize(disk)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if name.is_empty() {
        return (String::new(), 0);
    }
    let dev = roots.sys.join("class/block").join(&name);
    let size = read_small(&dev.join("size"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .and_then(|sectors| sectors.checked_mul(512))
        .unwrap_or(0);
    // A partition has no `device`; its parent directory is the disk's.
    let device = if dev.join("partition").exists() {
        std::fs::canonicalize(&dev)
            .ok()
            .and_then(|p| p.parent().map(|p| p.join("device")))
            .unwrap_or_else(|| dev.join("device"))
    } else {
        dev.join("device")
    };
    (clean(&disk_model(&device)), size)
}

/// `vendor model` of a SCSI/SATA disk, `model` of an NVMe one, or the
/// driver's name (`virtio`) for a disk without either.
fn disk_model(device: &Path) -> String {
    let field = |f: &str| {
        read_small(&device.join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let (vendor, model) = (field("vendor"), field("model"));
    let joined = match (vendor.is_empty(), model.is_empty()) {
        (_, true) => String::new(),
        (true, false) => model,
        (false, false) if model.starts_with(&vendor) => model,
        (false, false) => format!("{vendor} {model}"),
    };
    if !joined.is_empty() {
        return joined;
    }
    // virtio_blk: the block device's parent is the virtio device, whose
    // driver link names the driver.
    let driver = std::fs::read_link(device.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if driver.starts_with("virtio") {
        "virtio".into()
    } else {
        driver
    }
}

/// Every NIC but loopback with a MAC address, by name, at most [`MAX_NICS`].
fn nics(class_net: &Path) -> Vec<Nic> {
    let mut out: Vec<Nic> = std::fs::read_dir(class_net)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = read_small(&e.path().join("address"))?.trim().to_string();
            let loopback = read_small(&e.path().join("type")).is_some_and(|t| t.trim() == "772");
            (name != "lo" && !loopback && !mac.is_empty() && mac != "00:00:00:00:00:00").then(
                || Nic {
                    name: clean(&name),
                    mac: clean(&mac),
                },
            )
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.truncate(MAX_NICS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_memory_and_cpu_lists() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz\n";
        assert_eq!(
            parse_cpu_model(x86),
            "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz"
        );
        let arm =
            "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(parse_cpu_model(arm), "Raspberry Pi 4 Model B Rev 1.4");
        assert_eq!(parse_cpu_model(""), "");
        assert_eq!(
            parse_mem_total("MemTotal:       16310084 kB\nMemFree: 1 kB\n"),
            Some(16310084 * 1024)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 99999999999999999999 kB\n"), None);
        assert_eq!(parse_cpu_list("0-3,6,8-9\n"), Some(7));
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn strings_are_printable_and_bounded() {
        assert_eq!(clean("  QEMU\n"), "QEMU");
        assert_eq!(
            clean("Standard PC\t(Q35 + ICH9, 2009)"),
            "Standard PC (Q35 + ICH9, 2009)"
        );
        assert_eq!(clean("bad\u{1b}[2Jname\u{7f}é"), "bad?[2Jname??");
        let long = "x".repeat(10_000);
        assert_eq!(clean(&long).len(), MAX_HARDWARE_FIELD);
        let words = "ab ".repeat(1_000);
        let c = clean(&words);
        assert!(c.len() <= MAX_HARDWARE_FIELD, "{}", c.len());
    }

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_fixture_machine_and_an_empty_one() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots {
            sys: tmp.path().join("sys"),
            proc: tmp.path().join("proc"),
        };
        put(&roots.sys, "class/dmi/id/sys_vendor", "Dell Inc.\n");
        put(&roots.sys, "class/dmi/id/product_name", "PowerEdge R640\n");
        put(&roots.sys, "devices/system/cpu/online", "0-15\n");
        put(
            &roots.proc,
            "cpuinfo",
            "model name\t: AMD EPYC 7302 16-Core Processor\n",
        );
        put(&roots.proc, "meminfo", "MemTotal: 1024 kB\n");
        put(&roots.sys, "class/net/lo/address", "00:00:00:00:00:00\n");
        put(&roots.sys, "class/net/eno1/address", "52:54:00:12:34:56\n");
        put(&roots.sys, "class/net/eno1/type", "1\n");
        for i in 0..100 {
            put(
                &roots.sys,
                &format!("class/net/veth{i:03}/address"),
                "02:00:00:00:00:01\n",
            );
        }
        let img = tmp.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let h = summary_at(&roots, &img);
        assert_eq!(h.vendor, "Dell Inc.");
        assert_eq!(h.product, "PowerEdge R640");
        assert_eq!(h.cpu_model, "AMD EPYC 7302 16-Core Processor");
        assert_eq!(h.cpus, 16);
        assert_eq!(h.memory_bytes, 1024 * 1024);
        assert_eq!((h.disk_model.as_str(), h.disk_size), ("", 4096));
        assert_eq!(h.nics.len(), MAX_NICS);
        assert_eq!(h.nics[0].name, "eno1");
        assert_eq!(h.nics[0].mac, "52:54:00:12:34:56");
        assert!(h.nics.iter().all(|n| n.name != "lo"));

        let empty = Roots {
            sys: tmp.path().join("none"),
            proc: tmp.path().join("none"),
        };
        let h = summary_at(&empty, &tmp.path().join("missing"));
        assert_eq!(h.vendor, "");
        assert_eq!(h.memory_bytes, 0);
        assert_eq!(h.disk_size, 0);
        assert!(h.nics.is_empty());
    }

    #[test]
    fn this_machine() {
        let h = summary(Path::new("/nonexistent"));
        assert!(h.cpus > 0, "{h:?}");
        assert!(h.memory_bytes > 0, "{h:?}");
    }
}
