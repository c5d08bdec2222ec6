//! `kiln-agent capture` of a 4 GiB sparse disk holding about 300 MiB: the
//! image is much smaller than the disk, and the capture reads much less
//! than 4 GiB because free ext4 blocks are never read.

mod common;

use std::io::Write;
use std::process::Command;

use common::*;

#[test]
fn a_mostly_empty_4gib_disk_captures_small_and_reads_little() {
    if !can_run("a_mostly_empty_4gib_disk_captures_small_and_reads_little") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    ok(Command::new("sh")
        .arg("-c")
        .arg("printf 'label: gpt\\n,,L\\n' | sfdisk -q \"$1\"")
        .arg("sh")
        .arg(&disk));
    let part = Loop::new(&disk, 1 << 20, Some((4 << 30) - (2 << 20)));
    ok(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", &part.0]));
    let mnt = dir.join("mnt");
    let m = Mounted::new(&part.0, &mnt, "rw");
    // 100 MiB of random data and 200 MiB of compressible text.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut random = vec![0u8; 100 << 20];
    for chunk in random.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(mnt.join("random.bin"), &random).unwrap();
    let mut text = std::io::BufWriter::new(std::fs::File::create(mnt.join("text.log")).unwrap());
    let mut text_len = 0u64;
    while text_len < 200 << 20 {
        let line = format!("{text_len:012} the quick brown fox jumps over the lazy dog.\n");
        text.write_all(line.as_bytes()).unwrap();
        text_len += line.len() as u64;
    }
    text.into_inner().unwrap().sync_all().unwrap();
    drop(m);
    drop(part);

    let out_img = dir.join("disk.raw.zst");
    let out = run(Command::new(AGENT)
        .arg("capture")
        .arg("--disk")
        .arg(&disk)
        .arg("--out")
        .arg(&out_img));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mtext = std::fs::read_to_string(dir.join("disk.manifest.toml")).unwrap();
    let m = kiln_spool::manifest::ImageManifest::parse(&mtext).unwrap();
    // The manifest says what captured it, on what machine.
    let p = m.provenance.as_ref().expect("the manifest has provenance");
    assert_eq!(p.kiln_version, env!("CARGO_PKG_VERSION"));
    assert!(p.hardware.cpus > 0 && p.hardware.memory_bytes > 0, "{p:?}");
    assert!(
        m.phases.iter().all(|t| t.started.is_some()),
        "{:?}",
        m.phases
    );
    assert_eq!(m.disk_size, 4 << 30);
    assert!(
        m.bytes_read < 1 << 30,
        "the capture read {} bytes of a 4 GiB disk",
        m.bytes_read
    );
    assert!(
        m.bytes_read > 300 << 20,
        "the capture read only {} bytes",
        m.bytes_read
    );
    let size = std::fs::metadata(&out_img).unwrap().len();
    assert_eq!(size, m.image_size);
    assert!(size < 200 << 20, "the image is {size} bytes");

    let verify = run(Command::new(AGENT).arg("verify").arg(&out_img));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The decompressed disk is a clean filesystem with the same files.
    let raw = dir.join("restored.raw");
    ok(Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(&out_img)
        .arg("-o")
        .arg(&raw));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 << 30);
    let part = Loop::new(&raw, 1 << 20, Some((4 << 30) - (2 << 20)));
    ok(Command::new("e2fsck").args(["-fn", &part.0]));
    let m = Mounted::new(&part.0, &dir.join("restored"), "ro");
    assert!(
        std::fs::read(m.0.join("random.bin")).unwrap() == random,
        "random.bin differs"
    );
    let restored = std::fs::metadata(m.0.join("text.log")).unwrap().len();
    assert_eq!(restored, text_len);
}
