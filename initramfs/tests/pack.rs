//! kiln-initramfs against Debian's kernel modules (fetched into the build
//! cache by scripts/fetch-kernel.sh) and the host's tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The unpacked kernel tree, fetched when absent.
fn kernel() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("scripts/fetch-kernel.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/fetch-kernel.sh");
    assert!(out.status.success(), "scripts/fetch-kernel.sh failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("fetch-kernel.sh printed nothing"),
    )
}

fn pack(args: &[&str], out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln-initramfs"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "kiln-initramfs {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn list(image: &Path, decompress: &str) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{decompress} < '{}' | cpio -id --quiet --no-absolute-filenames --nonmatching 'dev/*' && find . | sort",
        image.display()
    );
    let o = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let names = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches("./").to_owned())
        .collect();
    (names, dir)
}

#[test]
fn same_inputs_give_the_same_bytes_and_the_image_holds_the_minimal_os() {
    let kernel = kernel();
    let tmp = tempfile::tempdir().unwrap();
    let agent = tmp.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\necho agent\n").unwrap();
    let agent_config = tmp.path().join("agent.toml");
    std::fs::write(&agent_config, b"servers = []\n").unwrap();
    let config = tmp.path().join("initramfs.toml");
    std::fs::write(
        &config,
        format!(
            "agent = \"agent\"\nagent_config = \"agent.toml\"\nkernel_modules = \"{}\"\n",
            kernel.display()
        ),
    )
    .unwrap();

    let a = tmp.path().join("a.img");
    let b = tmp.path().join("b.img");
    let report = pack(&["--config", config.to_str().unwrap()], &a);
    // A second run, from flags alone, with the same inputs.
    pack(
        &[
            "--agent",
            agent.to_str().unwrap(),
            "--agent-config",
            agent_config.to_str().unwrap(),
            "--kernel-modules",
            kernel.to_str().unwrap(),
            "--compress",
            "zstd",
        ],
        &b,
    );
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "two packs of the same inputs differ"
    );
    for word in ["modules", "tools", "libraries", "busybox", "total", "zstd"] {
        assert!(report.contains(word), "report lacks {word}:\n{report}");
    }
    let size = std::fs::metadata(&a).unwrap().len();
    assert!(size < 32 << 20, "{size} bytes is over the 32 MiB target");

    let (names, root) = list(&a, "zstd -dc");
    let has = |p: &str| names.iter().any(|n| n == p);
    let version = std::fs::read_to_string(kernel.join("version"))
        .unwrap()
        .trim()
        .to_owned();
    let mods = format!("lib/modules/{version}");
    for p in [
        "init",
        "etc/kiln/agent.toml",
        "bin/busybox",
        "bin/sh",
        "bin/udhcpc",
        "sbin/modprobe",
        "sbin/mke2fs",
        "sbin/mkfs.vfat",
        "sbin/mkswap",
        // A deploy grows the last ext4 to fill a larger disk.
        "sbin/e2fsck",
        "sbin/resize2fs",
        "lib64/ld-linux-x86-64.so.2",
        "etc/udhcpc/default.script",
        "usr/share/udhcpc/default.script",
        &format!("{mods}/modules.dep"),
        &format!("{mods}/modules.alias"),
        &format!("{mods}/modules.softdep"),
        &format!("{mods}/kernel/drivers/block/virtio_blk.ko"),
        &format!("{mods}/kernel/drivers/net/virtio_net.ko"),
        &format!("{mods}/kernel/fs/ext4/ext4.ko"),
        &format!("{mods}/kernel/fs/fat/vfat.ko"),
        &format!("{mods}/kernel/crypto/crc32c_generic.ko"),
    ] {
        assert!(has(p), "image lacks {p}");
    }
    assert!(
        names.iter().any(|n| n.ends_with("/libext2fs.so.2")),
        "image lacks mke2fs's libext2fs"
    );
    assert!(!names
        .iter()
        .any(|n| n.ends_with(".ko.xz") || n.ends_with(".ko.zst")));

    // Every module named in modules.dep is in the image, and loading each
    // line's list from its end satisfies every module's depends=.
    let dep = std::fs::read_to_string(root.path().join(&mods).join("modules.dep")).unwrap();
    let parsed = kiln_initramfs::modules::parse_modules_dep(&dep);
    for line in dep.lines() {
        let (module, deps) = line.split_once(':').unwrap();
        for p in std::iter::once(module).chain(deps.split_whitespace()) {
            assert!(has(&format!("{mods}/{p}")), "modules.dep names missing {p}");
        }
    }
    let mut order = parsed["virtio_net"].clone();
    order.reverse();
    order.push("virtio_net".into());
    for (i, m) in order.iter().enumerate() {
        let path = dep
            .lines()
            .find_map(|l| {
                let p = l.split_once(':')?.0;
                (kiln_initramfs::modules::module_name_of(p).as_deref() == Some(m.as_str()))
                    .then_some(p)
            })
            .unwrap();
        let data = std::fs::read(root.path().join(&mods).join(path)).unwrap();
        let info = kiln_initramfs::modules::parse_modinfo(
            kiln_initramfs::modules::modinfo_section(&data).unwrap(),
        );
        for d in info.depends {
            assert!(
                order[..i].contains(&d),
                "{m} needs {d} loaded before it: {order:?}"
            );
        }
    }
    let alias = std::fs::read_to_string(root.path().join(&mods).join("modules.alias")).unwrap();
    assert!(
        alias.contains("alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci"),
        "{alias}"
    );
    assert!(
        alias.contains("alias crypto-crc32c crc32c_generic"),
        "{alias}"
    );
    let softdep = std::fs::read_to_string(root.path().join(&mods).join("modules.softdep")).unwrap();
    assert!(
        softdep.contains("softdep ext4 pre: crypto-crc32c"),
        "{softdep}"
    );
}

#[test]
fn gzip_images_unpack_too() {
    let kernel = kernel();
    let tmp = tempfile::tempdir().unwrap();
    let agent = tmp.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\n").unwrap();
    let out = tmp.path().join("i.img");
    let report = pack(
        &[
            "--agent",
            agent.to_str().unwrap(),
            "--kernel-modules",
            kernel.to_str().unwrap(),
            "--compress",
            "gzip",
        ],
        &out,
    );
    assert!(report.contains("gzip"), "{report}");
    let (names, _root) = list(&out, "gzip -dc");
    assert!(names.iter().any(|n| n == "init"));
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("initramfs.toml");
    std::fs::write(
        &config,
        "agent = \"missing-agent\"\nkernel_modules = \"nowhere\"\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln-initramfs"))
        .args(["--config", config.to_str().unwrap(), "--out"])
        .arg(tmp.path().join("x.img"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing-agent"), "{err}");
    assert!(!tmp.path().join("x.img").exists());
}

#[test]
fn compressed_modules_are_packed_plain_with_dependencies_from_modinfo() {
    let kernel = kernel();
    let version = std::fs::read_to_string(kernel.join("version"))
        .unwrap()
        .trim()
        .to_owned();
    let src = kernel.join("lib/modules").join(&version);
    // A small tree: virtio_blk and what it needs, compressed three ways,
    // and no modules.dep, as Debian ships it.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib/modules").join(&version);
    let files = [
        ("kernel/drivers/block/virtio_blk.ko", "xz --check=crc32 -c"),
        ("kernel/drivers/virtio/virtio.ko", "zstd -q -c"),
        ("kernel/drivers/virtio/virtio_ring.ko", "cat"),
    ];
    for (rel, tool) in files {
        let from = src.join(rel);
        let ext = match tool {
            t if t.starts_with("xz") => ".xz",
            t if t.starts_with("zstd") => ".zst",
            _ => "",
        };
        let to = root.join(format!("{rel}{ext}"));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("{tool} '{}' > '{}'", from.display(), to.display()))
            .status()
            .unwrap();
        assert!(st.success(), "{tool} {}", from.display());
    }
    let mut tree = kiln_initramfs::modules::ModuleTree::open(tmp.path()).unwrap();
    assert_eq!(tree.version(), version);
    assert!(!tree.has_modules_dep());
    let set = tree.select(&["virtio-blk".to_string()]).unwrap();
    let names: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
    for (m, (rel, _)) in set.modules.iter().rev().zip(files) {
        assert_eq!(m.rel_path, rel);
        assert_eq!(m.data, std::fs::read(src.join(rel)).unwrap(), "{rel}");
    }
    assert_eq!(
        set.modules_dep().lines().last().unwrap(),
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko"
    );
    let err = tree.select(&["no_such_module".to_string()]).unwrap_err();
    assert!(err.to_string().contains("no_such_module"), "{err}");
}
