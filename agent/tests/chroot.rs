//! Target steps run in a real chroot: /dev with pts, shm and the udev-style
//! /dev/disk links of the target's partitions, /run as tmpfs, the agent's
//! resolv.conf while they run, `KILN_DISK` and `KILN_ROOT_DEVICE`; every
//! mount is undone, also when a step fails, and a daemon a step leaves
//! behind neither hangs the build nor survives it. Then the image is
//! generalized, and `[boot]` refuses a payload without its loader. The
//! payloads come as tar.xz and tar.gz.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;

/// busybox as the applets the steps use, a resolv.conf, a machine-id and
/// an SSH host key of the "build machine"; compressed as the name says
/// (`.tar`, `.tar.gz`, `.tar.xz`).
fn payload(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    for dir in [
        "bin",
        "etc",
        "etc/ssh",
        "dev",
        "run",
        "tmp",
        "var/lib/systemd",
    ] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("./{dir}/"), std::io::empty())
            .unwrap();
    }
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "./bin/busybox", &busybox[..])
        .unwrap();
    for tool in [
        "sh", "cat", "ls", "readlink", "grep", "awk", "setsid", "sleep", "echo", "test", "cut",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0, 0);
        b.append_link(&mut h, format!("./bin/{tool}"), "busybox")
            .unwrap();
    }
    for (path, text) in [
        ("etc/resolv.conf", "nameserver 192.0.2.53\n"),
        ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
        ("etc/ssh/ssh_host_ed25519_key", "secret\n"),
        (
            "etc/ssh/ssh_host_ed25519_key.pub",
            "ssh-ed25519 AAAA root@(none)\n",
        ),
        ("var/lib/systemd/random-seed", "seed"),
    ] {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        b.append_data(&mut h, format!("./{path}"), text.as_bytes())
            .unwrap();
    }
    let tar = b.into_inner().unwrap();
    let name = path.to_string_lossy();
    let packed = if name.ends_with(".tar.xz") {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    } else if name.ends_with(".tar.gz") {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    } else {
        tar
    };
    std::fs::write(path, packed).unwrap();
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

const REPORT: &str = r#"
{
  echo "disk=$KILN_DISK root=$KILN_ROOT_DEVICE job=$KILN_JOB step=$KILN_STEP"
  for l in /dev/disk/by-uuid/* /dev/disk/by-label/* /dev/disk/by-partuuid/*; do echo "$l -> $(readlink $l)"; done
  awk '$2 ~ /^\/(dev|dev\/pts|dev\/shm|run|proc|sys)$/ { print "mount " $2 " " $3 }' /proc/mounts
  test -b "$KILN_ROOT_DEVICE" && echo "root-is-block"
  test -b "$KILN_DISK" && echo "disk-is-block"
  test -c /dev/null && echo "null-is-char"
  echo "resolv: $(cat /etc/resolv.conf)"
} > /etc/report
echo run > /run/left-in-run
"#;

fn job(extra_steps: &str) -> String {
    format!(
        r#"
id = "chroot"
[disk]
table = "gpt"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"

[[payloads]]
name = "root.tar.xz"

[[steps]]
name = "report"
run = '''{REPORT}'''

[[steps]]
name = "daemon"
run = "setsid sleep 3000 & echo started"
time_limit = "1m"
{extra_steps}
"#
    )
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

fn sleepers() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmd.starts_with(b"sleep\x003000") {
            n += 1;
        }
    }
    n
}

#[test]
fn target_steps_get_a_real_chroot_that_is_undone() {
    if !can_run("target_steps_get_a_real_chroot_that_is_undone") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    payload(&dir.join("payloads/root.tar.xz"));
    let started = std::time::Instant::now();
    let out = build(dir, &job(""), "64MiB");
    let log = std::fs::read_to_string(dir.join("image.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "build failed: {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon held the step's output; the build went on without it.
    assert!(started.elapsed().as_secs() < 120, "{log}");
    assert_eq!(sleepers(), 0, "the step's daemon survived the build");
    assert_eq!(mounts_under(dir), Vec::<String>::new());

    let raw = dir.join("image.raw");
    ok(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(dir.join("image.raw.zst"))
        .arg("-o")
        .arg(&raw));
    let root = Loop::new(&raw, 1 << 20, None);
    let uuid = ok(Command::new("blkid").args(["-s", "UUID", "-o", "value", &root.0]));
    let uuid = uuid.trim();
    let mnt = dir.join("mnt");
    let _m = Mounted::new(&root.0, &mnt, "ro");
    let report = std::fs::read_to_string(mnt.join("etc/report")).unwrap();
    let first = report.lines().next().unwrap();
    assert!(first.starts_with("disk=/dev/loop"), "{report}");
    assert!(first.contains(" root=/dev/loop"), "{report}");
    assert!(first.ends_with("p1 job=chroot step=report"), "{report}");
    let root_node = first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root=/dev/"))
        .unwrap();
    for want in [
        format!("/dev/disk/by-uuid/{uuid} -> ../../{root_node}"),
        format!("/dev/disk/by-label/root -> ../../{root_node}"),
        "mount /proc proc".into(),
        "mount /sys sysfs".into(),
        "mount /dev tmpfs".into(),
        "mount /dev/pts devpts".into(),
        "mount /dev/shm tmpfs".into(),
        "mount /run tmpfs".into(),
        "root-is-block".into(),
        "disk-is-block".into(),
        "null-is-char".into(),
    ] {
        assert!(
            report.lines().any(|l| l == want),
            "no {want:?} in\n{report}"
        );
    }
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("/dev/disk/by-partuuid/") && l.ends_with(root_node)),
        "{report}"
    );
    // The agent's resolv.conf while the step ran; the target's own after.
    let agent_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(
        report.contains(&format!("resolv: {}", agent_resolv.trim_end())),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("etc/resolv.conf")).unwrap(),
        "nameserver 192.0.2.53\n"
    );
    assert!(!mnt.join("etc/.kiln-saved-resolv.conf").exists());
    // /run was a tmpfs: nothing a step left there is in the image.
    assert!(!mnt.join("run/left-in-run").exists());
    // Generalized by default.
    assert_eq!(std::fs::read(mnt.join("etc/machine-id")).unwrap(), b"");
    assert!(!mnt.join("etc/ssh/ssh_host_ed25519_key").exists());
    assert!(!mnt.join("etc/ssh/ssh_host_ed25519_key.pub").exists());
    assert!(!mnt.join("var/lib/systemd/random-seed").exists());
    let manifest = kiln_spool::manifest::ImageManifest::parse(
        &std::fs::read_to_string(dir.join("image.manifest.toml")).unwrap(),
    )
    .unwrap();
    for line in [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/machine-id (emptied)",
        "/var/lib/systemd/random-seed",
    ] {
        assert!(
            manifest.generalized.iter().any(|l| l == line),
            "{line:?} not in {:?}",
            manifest.generalized
        );
    }
    assert!(
        log.contains("generalize: removed /etc/ssh/ssh_host_ed25519_key"),
        "{log}"
    );
}

#[test]
fn a_failing_step_leaves_no_mount_and_no_process_and_a_wiped_table() {
    if !can_run("a_failing_step_leaves_no_mount_and_no_process_and_a_wiped_table") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    payload(&dir.join("payloads/root.tar.xz"));
    let out = build(
        dir,
        &job("[[steps]]\nname = \"fails\"\nrun = \"setsid sleep 3000 & exit 3\"\n\n[image]\ngeneralize = false\n"),
        "64MiB",
    );
    assert!(!out.status.success());
    let log = std::fs::read_to_string(dir.join("image.log")).unwrap_or_default();
    assert!(log.contains("step \"fails\" failed"), "{log}");
    assert_eq!(sleepers(), 0, "a step's daemon survived the failed build");
    assert_eq!(mounts_under(dir), Vec::<String>::new());
    assert!(table_wiped(&dir.join("disk.img")));
}

#[test]
fn a_payload_without_the_loader_is_refused_by_package_name() {
    if !can_run("a_payload_without_the_loader_is_refused_by_package_name") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    payload(&dir.join("payloads/root.tar.gz"));
    let job = r#"
id = "noloader"
[disk]
table = "mbr"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
[[payloads]]
name = "root.tar.gz"
[boot]
firmware = "bios"
"#;
    let out = build(dir, job, "64MiB");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.join("image.log")).unwrap_or_default();
    for package in ["grub-pc-bin", "grub2-common", "grub-common"] {
        assert!(
            err.contains(package),
            "{package} not named in: {err}\n{log}"
        );
    }
    assert!(!err.contains("grub-efi-amd64-bin"), "{err}");
    assert!(table_wiped(&dir.join("disk.img")));
}
