//! A job with an MBR table: the image carries a DOS partition table with the
//! right types, 1 MiB aligned, and its filesystems are clean.

mod common;

use std::process::Command;

use common::*;

#[test]
fn an_mbr_layout_builds_and_captures() {
    if !can_run("an_mbr_layout_builds_and_captures") {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("mbr").tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("payloads")).unwrap();
    let job = r#"
id = "mbr"
[disk]
table = "mbr"
[[disk.partitions]]
label = "BOOT"
size = "16MiB"
kind = "esp"
fs = "vfat"
[[disk.partitions]]
label = "swap"
size = "8MiB"
kind = "swap"
fs = "swap"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
[configure]
hostname = "mbr-host"
"#;
    let out = build(dir, job, "96MiB");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The decompressed image, not the disk, is what a user deploys.
    let raw = dir.join("restored.img");
    ok(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(dir.join("image.raw.zst"))
        .arg("-o")
        .arg(&raw));
    let table = sfdisk_json(&raw).expect("sfdisk reads the restored image");
    let t = &table["partitiontable"];
    assert_eq!(t["label"], "dos", "{table}");
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{table}");
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ef", "82", "83"], "{table}");
    assert_eq!(parts[0]["start"], 2048, "1 MiB aligned: {table}");
    assert_eq!(parts[0]["size"], 16 * 2048, "{table}");
    for p in parts {
        assert_eq!(p["start"].as_u64().unwrap() % 2048, 0, "{table}");
    }
    let last = &parts[2];
    let end = last["start"].as_u64().unwrap() + last["size"].as_u64().unwrap();
    assert!(
        end <= 96 * 2048,
        "the root partition fits the disk: {table}"
    );
    assert!(
        end > 90 * 2048,
        "the rest of the disk goes to root: {table}"
    );

    // Filesystems in the restored image are clean.
    let root_off = last["start"].as_u64().unwrap() * 512;
    let root = dir.join("root.img");
    ok(Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", root.display()))
        .arg("bs=1M")
        .arg(format!("skip={}", root_off >> 20))
        .arg("status=none"));
    ok(Command::new("e2fsck").args(["-fn"]).arg(&root));
    let esp = format!(
        "{}@@{}",
        raw.display(),
        parts[0]["start"].as_u64().unwrap() * 512
    );
    let listing = ok(Command::new("mdir").args(["-i", &esp, "::/"]));
    assert!(
        listing.contains("BOOT"),
        "the ESP carries its label: {listing}"
    );
    let etc = ok(Command::new("debugfs")
        .args(["-R", "cat /etc/hostname"])
        .arg(&root));
    assert_eq!(etc.trim(), "mbr-host");
}
