//! `kiln-agent build` on a loop-backed disk image: the image it captures is
//! the system the job describes, checked with the tools a person would use.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// The base OS payload: busybox as /bin/sh, modes, owners, a symlink, a
/// hardlink, a setuid file, a device node and an xattr.
fn base_payload(path: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (dir, mode, uid) in [
        ("bin", 0o755, 0),
        ("etc", 0o755, 0),
        ("dev", 0o755, 0),
        ("srv", 0o750, 33),
    ] {
        let mut h = header(tar::EntryType::Directory, mode, uid, uid, 0);
        b.append_data(&mut h, format!("./{dir}/"), std::io::empty())
            .unwrap();
    }
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut h = header(tar::EntryType::Regular, 0o755, 0, 0, busybox.len() as u64);
    b.append_data(&mut h, "./bin/busybox", &busybox[..])
        .unwrap();
    for tool in ["sh", "ls", "cat", "echo", "id"] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        b.append_link(&mut h, format!("./bin/{tool}"), "busybox")
            .unwrap();
    }
    let motd = b"built by kiln\n";
    let mut h = header(tar::EntryType::Regular, 0o640, 33, 44, motd.len() as u64);
    b.append_data(&mut h, "./srv/motd", &motd[..]).unwrap();
    let mut h = header(tar::EntryType::Link, 0o640, 33, 44, 0);
    b.append_link(&mut h, "./srv/motd.hard", "./srv/motd")
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "./srv/motd.link", "motd").unwrap();
    let mut h = header(tar::EntryType::Regular, 0o4755, 0, 0, 3);
    b.append_data(&mut h, "./bin/suid", &b"#!\n"[..]).unwrap();
    let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "./dev/null", std::io::empty())
        .unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.kiln", &b"tagged"[..])])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 2);
    b.append_data(&mut h, "./etc/tagged", &b"x\n"[..]).unwrap();
    b.into_inner().unwrap().sync_all().unwrap();
}

/// The application payload, zstd-compressed, into /opt/app.
fn app_payload(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let data = b"#!/bin/sh\necho app\n";
    let mut h = header(
        tar::EntryType::Regular,
        0o755,
        1000,
        1000,
        data.len() as u64,
    );
    b.append_data(&mut h, "bin/app", &data[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let z = zstd::encode_all(&tar[..], 3).unwrap();
    std::fs::write(path, z).unwrap();
}

fn job(base_hash: &str, esp_mount: &str) -> String {
    format!(
        r#"
id = "full"
[disk]
table = "gpt"
[[disk.partitions]]
label = "ESP"
size = "32MiB"
kind = "esp"
fs = "vfat"
{esp_mount}
[[disk.partitions]]
label = "root"
size = "128MiB"
kind = "linux"
fs = "ext4"
mount = "/"
[[disk.partitions]]
label = "swap"
size = "16MiB"
kind = "swap"
fs = "swap"
[[disk.partitions]]
label = "data"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/srv/data"

[[payloads]]
name = "base.tar"
blake3 = "{base_hash}"
[[payloads]]
name = "app.tar.zst"
dest = "/opt/app"

[configure]
hostname = "web1.example.org"
timezone = "Europe/Paris"
[[configure.users]]
name = "ann"
uid = 1001
groups = ["wheel"]
password_hash = "$6$salt$hash"
authorized_keys = ["ssh-ed25519 AAAAC3Nza ann@laptop"]
[[configure.files]]
path = "/etc/app.conf"
content = "port = 8080\n"
mode = "0600"
owner = "ann:ann"

[[steps]]
name = "in-target"
run = "echo \"$(cat /etc/hostname) $(id -u)\" > /etc/step-ran; ls /proc/1 >/dev/null"
[[steps]]
name = "in-agent"
where = "agent"
run = "touch \"$KILN_TARGET/srv/data/agent-was-here\""
"#
    )
}

fn blkid_uuid(dev: &str) -> String {
    ok(Command::new("blkid").args(["-p", "-o", "value", "-s", "UUID", dev]))
        .trim()
        .to_string()
}

#[test]
fn a_full_build_captures_the_system_the_job_describes() {
    if !can_run("a_full_build_captures_the_system_the_job_describes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    base_payload(&dir.join("payloads/base.tar"));
    app_payload(&dir.join("payloads/app.tar.zst"));
    let base_hash = blake3_hex(&std::fs::read(dir.join("payloads/base.tar")).unwrap());
    let vfat = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("vfat");
    let esp_mount = if vfat { "mount = \"/boot/efi\"" } else { "" };
    let out = build(dir, &job(&base_hash, esp_mount), "256MiB");
    assert!(
        out.status.success(),
        "build failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("image.log")).unwrap_or_default()
    );

    // The image decompresses with the stock zstd tool to a disk of the same size.
    let raw = dir.join("image.raw");
    ok(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(dir.join("image.raw.zst"))
        .arg("-o")
        .arg(&raw));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 256 << 20);

    // The exact partition table.
    let t = sfdisk_json(&raw).expect("the image has a partition table");
    let t = &t["partitiontable"];
    assert_eq!(t["label"], "gpt");
    let parts = t["partitions"].as_array().unwrap();
    let want = [
        (2048, 65536, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ESP"),
        (
            67584,
            262144,
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "root",
        ),
        (
            329728,
            32768,
            "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
            "swap",
        ),
        (
            362496,
            522240 - 362496,
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "data",
        ),
    ];
    assert_eq!(parts.len(), want.len());
    for (p, (start, size, ty, name)) in parts.iter().zip(want) {
        assert_eq!(
            (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()),
            (start, size),
            "{p}"
        );
        assert_eq!(p["type"], ty);
        assert_eq!(p["name"], name);
    }

    // Clean filesystems.
    let esp = dir.join("esp.img");
    ok(Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", esp.display()))
        .args(["bs=512", "skip=2048", "count=65536", "status=none"]));
    ok(Command::new("fsck.vfat").arg("-n").arg(&esp));
    let mdir = ok(Command::new("mdir").arg("-i").arg(&esp).arg("::"));
    assert!(mdir.contains("ESP"), "{mdir}");
    let root = Loop::new(&raw, 67584 * 512, Some(262144 * 512));
    let swap = Loop::new(&raw, 329728 * 512, Some(32768 * 512));
    let data = Loop::new(&raw, 362496 * 512, Some((522240 - 362496) * 512));
    ok(Command::new("e2fsck").args(["-fn", &root.0]));
    ok(Command::new("e2fsck").args(["-fn", &data.0]));
    let esp_loop = Loop::new(&raw, 2048 * 512, Some(65536 * 512));

    let mnt = dir.join("mnt");
    let _root_m = Mounted::new(&root.0, &mnt, "ro");
    let _data_m = Mounted::new(&data.0, &mnt.join("srv/data"), "ro");
    let meta =
        |p: &str| std::fs::symlink_metadata(mnt.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));

    // Payload files with their modes, owners, symlinks, hardlinks, nodes, xattrs.
    assert_eq!(meta("srv").mode() & 0o7777, 0o750);
    assert_eq!((meta("srv").uid(), meta("srv").gid()), (33, 33));
    assert_eq!(
        std::fs::read(mnt.join("srv/motd")).unwrap(),
        b"built by kiln\n"
    );
    assert_eq!(meta("srv/motd").mode() & 0o7777, 0o640);
    assert_eq!((meta("srv/motd").uid(), meta("srv/motd").gid()), (33, 44));
    assert_eq!(meta("srv/motd.hard").ino(), meta("srv/motd").ino());
    assert_eq!(meta("srv/motd").nlink(), 2);
    assert!(meta("srv/motd.link").file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(mnt.join("srv/motd.link")).unwrap(),
        Path::new("motd")
    );
    assert_eq!(
        std::fs::read_link(mnt.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(meta("bin/suid").mode() & 0o7777, 0o4755);
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(meta("dev/null").file_type().is_char_device());
        assert_eq!(meta("dev/null").rdev(), libc::makedev(1, 3));
    }
    let mut value = [0u8; 64];
    let path = std::ffi::CString::new(mnt.join("etc/tagged").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: getxattr writes at most value.len() bytes into value.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.kiln".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..n.max(0) as usize], b"tagged", "xattr user.kiln");
    assert_eq!(meta("opt/app/bin/app").mode() & 0o7777, 0o755);
    assert_eq!(meta("opt/app/bin/app").uid(), 1000);

    // Configuration.
    let read =
        |p: &str| std::fs::read_to_string(mnt.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("etc/hostname"), "web1.example.org\n");
    assert!(read("etc/hosts").contains("127.0.1.1\tweb1.example.org web1\n"));
    assert_eq!(
        std::fs::read_link(mnt.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Paris")
    );
    assert!(read("etc/passwd")
        .lines()
        .any(|l| l == "ann:x:1001:1001:ann:/home/ann:/bin/sh"));
    assert!(read("etc/passwd")
        .lines()
        .any(|l| l.starts_with("root:x:0:0:")));
    assert!(read("etc/shadow")
        .lines()
        .any(|l| l.starts_with("ann:$6$salt$hash:")));
    assert_eq!(meta("etc/shadow").mode() & 0o777, 0o640);
    assert!(read("etc/group").lines().any(|l| l == "ann:x:1001:"));
    assert!(read("etc/group")
        .lines()
        .any(|l| l.starts_with("wheel:x:") && l.ends_with(":ann")));
    assert_eq!(meta("home/ann").uid(), 1001);
    assert_eq!(meta("home/ann/.ssh").mode() & 0o7777, 0o700);
    assert_eq!(meta("home/ann/.ssh/authorized_keys").mode() & 0o7777, 0o600);
    assert_eq!(meta("home/ann/.ssh/authorized_keys").uid(), 1001);
    assert_eq!(
        read("home/ann/.ssh/authorized_keys"),
        "ssh-ed25519 AAAAC3Nza ann@laptop\n"
    );
    assert_eq!(read("etc/app.conf"), "port = 8080\n");
    assert_eq!(meta("etc/app.conf").mode() & 0o7777, 0o600);
    assert_eq!(
        (meta("etc/app.conf").uid(), meta("etc/app.conf").gid()),
        (1001, 1001)
    );

    // fstab names each filesystem by the UUID blkid reads.
    let fstab = read("etc/fstab");
    assert!(
        fstab.contains(&format!("UUID={} / ext4", blkid_uuid(&root.0))),
        "{fstab}"
    );
    assert!(
        fstab.contains(&format!("UUID={} /srv/data ext4", blkid_uuid(&data.0))),
        "{fstab}"
    );
    assert!(
        fstab.contains(&format!("UUID={} none swap", blkid_uuid(&swap.0))),
        "{fstab}"
    );
    if vfat {
        assert!(
            fstab.contains(&format!("UUID={} /boot/efi vfat", blkid_uuid(&esp_loop.0))),
            "{fstab}"
        );
    }

    // The steps ran: chrooted in the target, and in the agent.
    assert_eq!(read("etc/step-ran"), "web1.example.org 0\n");
    assert!(mnt.join("srv/data/agent-was-here").exists());
    drop(_data_m);
    drop(_root_m);

    // The manifest matches the image, and `verify` says so.
    let m = kiln_spool::manifest::ImageManifest::parse(
        &std::fs::read_to_string(dir.join("image.manifest.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(m.job, "full");
    assert_eq!(
        m.job_blake3,
        blake3_hex(
            std::fs::read_to_string(dir.join("job.toml"))
                .unwrap()
                .as_bytes()
        )
    );
    assert_eq!(m.payloads.len(), 2);
    assert_eq!(m.payloads[0].blake3, base_hash);
    assert_eq!(
        m.payloads[1].blake3,
        blake3_hex(&std::fs::read(dir.join("payloads/app.tar.zst")).unwrap())
    );
    let names: Vec<&str> = m.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, common::BUILD_PHASES);
    let img = std::fs::read(dir.join("image.raw.zst")).unwrap();
    assert_eq!(m.image_size, img.len() as u64);
    assert_eq!(m.image_blake3, blake3_hex(&img));
    let raw_bytes = std::fs::read(&raw).unwrap();
    let mut pos = 0usize;
    for r in &m.ranges {
        let (s, e) = (r.offset as usize, (r.offset + r.length) as usize);
        assert!(
            raw_bytes[pos..s].iter().all(|&b| b == 0),
            "non-zero bytes outside the ranges"
        );
        assert_eq!(r.blake3, blake3_hex(&raw_bytes[s..e]), "range at {s}");
        pos = e;
    }
    assert!(raw_bytes[pos..].iter().all(|&b| b == 0));
    assert!(
        m.bytes_read < 256 << 20,
        "the capture read {} bytes",
        m.bytes_read
    );

    let verify = |image: &Path| {
        run(Command::new(AGENT)
            .arg("verify")
            .arg(image)
            .arg("--manifest")
            .arg(dir.join("image.manifest.toml")))
    };
    assert!(verify(&dir.join("image.raw.zst")).status.success());
    assert!(verify(&raw).status.success());

    // One flipped bit, in the raw disk or in the compressed file, is found.
    let r = &m.ranges[m.ranges.len() / 2];
    let mut flipped = raw_bytes.clone();
    flipped[(r.offset + r.length / 2) as usize] ^= 0x10;
    let bad_raw = dir.join("flipped.raw");
    std::fs::write(&bad_raw, &flipped).unwrap();
    let out = verify(&bad_raw);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has BLAKE3"),
        "{out:?}"
    );
    let mut bad_img = img.clone();
    let at = bad_img.len() / 2;
    bad_img[at] ^= 0x01;
    let bad_zst = dir.join("flipped.raw.zst");
    std::fs::File::create(&bad_zst)
        .unwrap()
        .write_all(&bad_img)
        .unwrap();
    let out = verify(&bad_zst);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

const ROOT_ONLY: &str = r#"
[disk]
table = "gpt"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
"#;

/// A 2 MiB tmpfs at `at`, unmounted on drop.
fn small_tmpfs(at: &Path) -> Mounted {
    std::fs::create_dir_all(at).unwrap();
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(at));
    Mounted(at.to_path_buf())
}

/// Regular files (and anything else that is not a directory) under `dir`.
fn non_dirs_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_streamed_build_stages_nothing_in_its_work_dir_or_tmp() {
    assert!(
        can_run("a_streamed_build_stages_nothing_in_its_work_dir_or_tmp"),
        "the line above says what is missing"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    // 8 MiB of noise, zstd-compressed (it stays 8 MiB): four times what
    // the work dir and TMPDIR hold.
    let mut noise = vec![0u8; 8 << 20];
    blake3::Hasher::new()
        .update(b"streamed")
        .finalize_xof()
        .fill(&mut noise);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, noise.len() as u64);
    b.append_data(&mut h, "srv/noise.bin", &noise[..]).unwrap();
    let z = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
    std::fs::write(dir.join("payloads/noise.tar.zst"), &z).unwrap();
    let job = format!(
        "id = \"streamed\"\n[[payloads]]\nname = \"noise.tar.zst\"\nblake3 = \"{}\"\n{ROOT_ONLY}",
        blake3_hex(&z)
    );
    std::fs::write(dir.join("job.toml"), job).unwrap();
    let work = dir.join("work");
    let _scratch = small_tmpfs(&work);
    let tmpdir = work.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let out = run(Command::new(AGENT)
        .arg("build")
        .arg("--job")
        .arg(dir.join("job.toml"))
        .arg("--payloads")
        .arg(dir.join("payloads"))
        .arg("--disk")
        .arg(dir.join("disk.img"))
        .args(["--disk-size", "64MiB"])
        .arg("--out")
        .arg(dir.join("image.raw.zst"))
        .arg("--work-dir")
        .arg(&work)
        .env("TMPDIR", &tmpdir));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("image.log")).unwrap_or_default()
    );
    assert_eq!(non_dirs_under(&work), Vec::<std::path::PathBuf>::new());

    // The payload reached the target whole.
    ok(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(dir.join("image.raw.zst"))
        .arg("-o")
        .arg(dir.join("image.raw")));
    let t = sfdisk_json(&dir.join("image.raw")).expect("a partition table");
    let p = &t["partitiontable"]["partitions"][0];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let root = Loop::new(&dir.join("image.raw"), start * 512, Some(size * 512));
    let _m = Mounted::new(&root.0, &dir.join("mnt"), "ro");
    assert!(std::fs::read(dir.join("mnt/srv/noise.bin")).unwrap() == noise);
}

#[test]
fn a_dest_or_hardlink_through_a_planted_symlink_writes_nothing_outside() {
    assert!(
        can_run("a_dest_or_hardlink_through_a_planted_symlink_writes_nothing_outside"),
        "the line above says what is missing"
    );
    for (case, second) in [
        // The second payload's dest is the symlink the first one planted.
        ("dest", "dest = \"/opt\""),
        // The second payload hardlinks a file outside through it.
        ("hardlink", "dest = \"/\""),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("payloads")).unwrap();
        let outside = dir.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host file\n").unwrap();
        let tar = |name: &str, f: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
            let mut b = tar::Builder::new(Vec::new());
            f(&mut b);
            std::fs::write(dir.join("payloads").join(name), b.into_inner().unwrap()).unwrap();
        };
        tar("one.tar", &|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
            b.append_link(&mut h, "opt", &outside).unwrap();
        });
        tar("two.tar", &|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 4);
            b.append_data(&mut h, "pwned", &b"bad\n"[..]).unwrap();
            let mut h = header(tar::EntryType::Link, 0o644, 0, 0, 0);
            b.append_link(&mut h, "stolen", "opt/secret").unwrap();
        });
        let job = format!(
            "id = \"planted\"\n[[payloads]]\nname = \"one.tar\"\n[[payloads]]\nname = \"two.tar\"\n{second}\n{ROOT_ONLY}"
        );
        let out = build(dir, &job, "64MiB");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert!(
            stderr.contains("payload \"two.tar\"") && stderr.contains("resolves outside"),
            "{case}: {stderr}"
        );
        assert!(table_wiped(&dir.join("disk.img")), "{case}: {stderr}");
        let mut left: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["secret"], "{case}: the payload wrote outside");
        assert_eq!(
            std::fs::metadata(outside.join("secret")).unwrap().nlink(),
            1,
            "{case}: a hardlink to a file outside was made"
        );
    }
}
