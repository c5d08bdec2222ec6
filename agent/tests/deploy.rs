//! `kiln-agent deploy`: a captured, signed image of a small GPT disk (a FAT
//! ESP and an ext4 root holding files) is written to a larger file and a
//! larger loop device and grown; tampered manifests, images and signatures
//! are refused before a byte is written; a range that changes between the
//! pre-check and the write stops the deploy with the table wiped.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use common::*;
use kiln_agent::deploy::{check_signed, deploy, DeployOptions, ImageSource};
use kiln_spool::manifest::ImageManifest;
use kiln_spool::signature::{AllowedSigners, SigningKey};

const MIB: u64 = 1 << 20;
const IMAGE_DISK: u64 = 40 * MIB;
const TARGET_DISK: u64 = 72 * MIB;

/// A published image directory and what made it.
struct Published {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// The published directory: image.raw.zst, manifest.toml, manifest.toml.sig.
    image: PathBuf,
    /// The disk the image was captured from.
    source_disk: PathBuf,
    signers: PathBuf,
    key: SigningKey,
    manifest: ImageManifest,
}

fn for_each_line(text: &str) -> String {
    let mut s = String::new();
    let mut n = 0u64;
    while s.len() < 3 << 20 {
        s.push_str(&format!("{n:08} {text}\n"));
        n += 1;
    }
    s
}

/// Partitions a 40 MiB disk with a GPT (ESP + ext4 root with files),
/// captures it with `kiln-agent capture` and signs its manifest.
fn published(test: &str) -> Published {
    published_with(test, "label: gpt\\n,8MiB,U\\n,,L\\n")
}

/// The same, partitioned by `sfdisk` from `script` (printf escapes).
fn published_with(test: &str, script: &str) -> Published {
    assert!(can_run(test));
    for tool in ["resize2fs", "dumpe2fs"] {
        assert!(
            Path::new("/usr/sbin").join(tool).exists() || Path::new("/sbin").join(tool).exists(),
            "{test}: {tool} is not installed (e2fsprogs, scripts/install-deps.sh)"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let disk = dir.join("source.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(IMAGE_DISK)
        .unwrap();
    ok(Command::new("sh")
        .arg("-c")
        .arg("printf \"$2\" | sfdisk -q \"$1\"")
        .arg("sh")
        .arg(&disk)
        .arg(script));
    let table = sfdisk_json(&disk).unwrap();
    let parts = &table["partitiontable"]["partitions"];
    let start = |i: usize| parts[i]["start"].as_u64().unwrap() * 512;
    let size = |i: usize| parts[i]["size"].as_u64().unwrap() * 512;
    {
        let esp = Loop::new(&disk, start(0), Some(size(0)));
        ok(Command::new("mkfs.vfat").args(["-n", "ESP", &esp.0]));
        let root = Loop::new(&disk, start(1), Some(size(1)));
        ok(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-L", "root", &root.0]));
        let mnt = dir.join("mnt");
        let m = Mounted::new(&root.0, &mnt, "rw");
        std::fs::write(mnt.join("hello.txt"), "hello from the image\n").unwrap();
        std::fs::write(mnt.join("log.txt"), for_each_line("the quick brown fox")).unwrap();
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut random = vec![0u8; 4 << 20];
        for c in random.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes());
        }
        std::fs::write(mnt.join("random.bin"), &random).unwrap();
        drop(m);
    }
    let out = dir.join("captured.raw.zst");
    ok(Command::new(AGENT)
        .arg("capture")
        .arg("--disk")
        .arg(&disk)
        .arg("--out")
        .arg(&out));
    let image = dir.join("published");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::rename(&out, image.join("image.raw.zst")).unwrap();
    let mtext = std::fs::read(dir.join("captured.manifest.toml")).unwrap();
    std::fs::write(image.join("manifest.toml"), &mtext).unwrap();
    let key = SigningKey::generate("kiln-master test").unwrap();
    std::fs::write(image.join("manifest.toml.sig"), key.sign(&mtext).unwrap()).unwrap();
    let signers = dir.join("allowed_signers");
    std::fs::write(
        &signers,
        format!("{}\n", key.allowed_signers_line("kiln-master")),
    )
    .unwrap();
    let manifest = ImageManifest::parse(std::str::from_utf8(&mtext).unwrap()).unwrap();
    assert!(manifest.ranges.len() >= 3, "{:?}", manifest.ranges);
    Published {
        _tmp: tmp,
        dir,
        image,
        source_disk: disk,
        signers,
        key,
        manifest,
    }
}

fn deploy_cli(p: &Published, disk: &Path, extra: &[&str]) -> std::process::Output {
    run(Command::new(AGENT)
        .arg("deploy")
        .arg("--image")
        .arg(&p.image)
        .arg("--disk")
        .arg(disk)
        .arg("--signers")
        .arg(&p.signers)
        .args(extra))
}

/// A target file filled with a pattern, so that any write shows.
fn patterned_target(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("target.img");
    let mut f = std::fs::File::create(&path).unwrap();
    let block: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    for _ in 0..size / MIB {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    path
}

fn file_blake3(path: &Path) -> String {
    blake3_hex(&std::fs::read(path).unwrap())
}

/// The target's bytes on every data range equal the captured disk's, and
/// every byte between them (up to the image's end) is zero.
fn assert_deployed_exactly(p: &Published, target: &Path) {
    let src = std::fs::read(&p.source_disk).unwrap();
    let dst = std::fs::read(target).unwrap();
    let mut at = 0usize;
    for (i, r) in p.manifest.ranges.iter().enumerate() {
        let (a, b) = (r.offset as usize, (r.offset + r.length) as usize);
        assert!(src[a..b] == dst[a..b], "range {i} (bytes {a}..{b}) differs");
        assert!(
            dst[at..a].iter().all(|&x| x == 0),
            "bytes {at}..{a}, outside the data ranges, are not zero"
        );
        at = b;
    }
    assert!(dst[at..IMAGE_DISK as usize].iter().all(|&x| x == 0));
}

/// Checks the grown disk the way an operator would: the table verifies,
/// the last partition ends at the disk's last aligned MiB, its ext4 fills
/// it and is clean, and the files are there.
fn assert_grown(p: &Published, disk: &Path, dev_for_fs: &dyn Fn(u64, u64) -> Loop) {
    let verify = ok(Command::new("sfdisk").arg("--verify").arg(disk));
    assert!(verify.contains("No errors detected"), "{verify}");
    let table = sfdisk_json(disk).unwrap();
    let t = &table["partitiontable"];
    let sectors = TARGET_DISK / 512;
    assert_eq!(t["lastlba"].as_u64().unwrap(), sectors - 34, "{table}");
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    let start = parts[1]["start"].as_u64().unwrap() * 512;
    let size = parts[1]["size"].as_u64().unwrap() * 512;
    assert_eq!(
        (start + size) % MIB,
        0,
        "the grown partition ends off a MiB boundary"
    );
    assert!(
        start + size > TARGET_DISK - 2 * MIB,
        "partition 2 ends at {} of a {TARGET_DISK}-byte disk",
        start + size
    );
    let part = dev_for_fs(start, size);
    let out = run(Command::new("e2fsck").args(["-f", "-n", &part.0]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let head = ok(Command::new("dumpe2fs").args(["-h", &part.0]));
    let field = |name: &str| -> u64 {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in dumpe2fs -h"))
            .trim()
            .parse()
            .unwrap()
    };
    let fs_bytes = field("Block count:") * field("Block size:");
    assert!(
        fs_bytes > size - MIB && fs_bytes <= size,
        "the filesystem holds {fs_bytes} bytes of a {size}-byte partition"
    );
    let blkid = ok(Command::new("blkid").args(["-o", "value", "-s", "LABEL", &part.0]));
    assert_eq!(blkid.trim(), "root");
    let mnt = p.dir.join("check");
    let m = Mounted::new(&part.0, &mnt, "ro");
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello from the image\n"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("log.txt")).unwrap(),
        for_each_line("the quick brown fox")
    );
    drop(m);
}

#[test]
fn a_signed_image_deploys_to_a_larger_file_and_grows() {
    let p = published("a_signed_image_deploys_to_a_larger_file_and_grows");
    let target = p.dir.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(TARGET_DISK)
        .unwrap();
    // Without the grow, the disk holds the image's bytes and nothing else.
    let out = deploy_cli(&p, &target, &["--no-grow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_deployed_exactly(&p, &target);
    let out = deploy_cli(&p, &target, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("partition 2 grown"), "{stdout}");
    for phase in ["check", "deploy", "readback", "grow"] {
        assert!(stderr.contains(&format!("{phase}: done")), "{stderr}");
    }
    assert_eq!(std::fs::metadata(&target).unwrap().len(), TARGET_DISK);
    // The ESP and everything before the root's superblock are the image's.
    let src = std::fs::read(&p.source_disk).unwrap();
    let dst = std::fs::read(&target).unwrap();
    assert!(src[MIB as usize..9 * MIB as usize] == dst[MIB as usize..9 * MIB as usize]);
    assert_grown(&p, &target, &|start, size| {
        Loop::new(&target, start, Some(size))
    });
}

#[test]
fn a_signed_image_deploys_to_a_larger_loop_device_and_grows() {
    let p = published("a_signed_image_deploys_to_a_larger_loop_device_and_grows");
    let backing = patterned_target(&p.dir, TARGET_DISK);
    let dev = Loop::new(&backing, 0, None);
    let disk = PathBuf::from(&dev.0);
    let out = deploy_cli(&p, &disk, &["--no-grow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Discarded gaps on a loop device read back as zeros: the pattern is gone.
    assert_deployed_exactly(&p, &disk);
    let out = deploy_cli(&p, &disk, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("grow: partition 2 now ends"), "{stderr}");
    assert_grown(&p, &disk, &|start, size| {
        Loop::new(&backing, start, Some(size))
    });
    // The grow made the kernel show the partitions; drop them before the
    // loop device is detached, as a fresh one must not inherit them.
    let f = std::fs::File::open(&disk).unwrap();
    kiln_agent::disk::partition::drop_partitions(&f, &disk);
}

#[test]
fn an_mbr_image_deploys_to_a_larger_disk_and_is_not_grown() {
    let p = published_with(
        "an_mbr_image_deploys_to_a_larger_disk_and_is_not_grown",
        "label: dos\\n,8MiB,ef\\n,,L\\n",
    );
    let target = p.dir.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(TARGET_DISK)
        .unwrap();
    let out = deploy_cli(&p, &target, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("grow: the image has an MBR partition table: nothing is grown"),
        "{stderr}"
    );
    assert_deployed_exactly(&p, &target);
    let table = sfdisk_json(&target).unwrap();
    assert_eq!(table["partitiontable"]["label"], "dos");
}

fn assert_refused_untouched(p: &Published, image: &Path, want: &str) {
    let target = patterned_target(&p.dir, TARGET_DISK);
    let before = file_blake3(&target);
    let out = run(Command::new(AGENT)
        .arg("deploy")
        .arg("--image")
        .arg(image)
        .arg("--disk")
        .arg(&target)
        .arg("--signers")
        .arg(&p.signers));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(want), "expected {want:?} in: {stderr}");
    assert_eq!(file_blake3(&target), before, "the target disk was written");
}

#[test]
fn a_manifest_changed_by_one_byte_is_refused_before_writing() {
    let p = published("a_manifest_changed_by_one_byte_is_refused_before_writing");
    let path = p.image.join("manifest.toml");
    let mut text = std::fs::read(&path).unwrap();
    // The disk size's first digit, one higher.
    let at = find(&text, b"disk_size = ") + 12;
    text[at] += 1;
    std::fs::write(&path, &text).unwrap();
    assert_refused_untouched(&p, &p.image, "changed after signing");
}

#[test]
fn an_image_changed_by_one_byte_is_refused_before_writing() {
    let p = published("an_image_changed_by_one_byte_is_refused_before_writing");
    let path = p.image.join("image.raw.zst");
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&path, &data).unwrap();
    assert_refused_untouched(&p, &p.image, "the signed manifest says");
    // It says where the image differs, and that the disk was not written.
    assert_refused_untouched(&p, &p.image, "nothing was written");
    assert_refused_untouched(&p, &p.image, "range");
}

#[test]
fn a_signature_by_an_unknown_key_is_refused() {
    let p = published("a_signature_by_an_unknown_key_is_refused");
    let other = SigningKey::generate("someone else").unwrap();
    let text = std::fs::read(p.image.join("manifest.toml")).unwrap();
    std::fs::write(
        p.image.join("manifest.toml.sig"),
        other.sign(&text).unwrap(),
    )
    .unwrap();
    assert_refused_untouched(&p, &p.image, "not an allowed signer");
    // The library says the same, naming the key.
    let signers = AllowedSigners::load(&p.signers).unwrap();
    let e = check_signed(&text, &other.sign(&text).unwrap(), &signers).unwrap_err();
    assert!(e.is_input());
    assert!(e.to_string().contains(&other.fingerprint()), "{e}");
    assert!(check_signed(&text, &p.key.sign(&text).unwrap(), &signers).is_ok());
}

#[test]
fn without_an_allowed_signer_the_deploy_says_how_to_get_one() {
    let p = published("without_an_allowed_signer_the_deploy_says_how_to_get_one");
    let target = patterned_target(&p.dir, TARGET_DISK);
    let before = file_blake3(&target);
    let out = run(Command::new(AGENT)
        .arg("deploy")
        .arg("--image")
        .arg(&p.image)
        .arg("--disk")
        .arg(&target)
        .arg("--config")
        .arg(p.dir.join("no-such-agent.toml")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("kiln-master signer"), "{stderr}");
    assert_eq!(file_blake3(&target), before);
}

#[test]
fn a_disk_smaller_than_the_image_is_refused_untouched() {
    let p = published("a_disk_smaller_than_the_image_is_refused_untouched");
    let target = patterned_target(&p.dir, IMAGE_DISK - MIB);
    let before = file_blake3(&target);
    let out = deploy_cli(&p, &target, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the image needs 40.0 MiB"), "{stderr}");
    assert_eq!(file_blake3(&target), before);
}

/// The server's image: the checked one on the first open, another one
/// (one data byte flipped, compressed again) on the second.
struct ChangingSource {
    checked: PathBuf,
    changed: Vec<u8>,
    opens: usize,
}

impl ImageSource for ChangingSource {
    fn open(&mut self) -> std::io::Result<Box<dyn Read + Send>> {
        self.opens += 1;
        if self.opens == 1 {
            Ok(Box::new(std::fs::File::open(&self.checked)?))
        } else {
            Ok(Box::new(std::io::Cursor::new(self.changed.clone())))
        }
    }
    fn describe(&self) -> String {
        "the job server's image".into()
    }
}

#[test]
fn a_range_changed_after_the_precheck_fails_names_the_range_and_wipes_the_table() {
    let p =
        published("a_range_changed_after_the_precheck_fails_names_the_range_and_wipes_the_table");
    let image = p.image.join("image.raw.zst");
    let mut raw = zstd::decode_all(std::fs::File::open(&image).unwrap()).unwrap();
    // A byte in the middle of the last range (the ext4 root's data).
    let (index, r) = p
        .manifest
        .ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| r.length > 8192 && r.offset >= MIB)
        .max_by_key(|(_, r)| r.length)
        .unwrap();
    let flip = (r.offset + r.length / 2) as usize;
    raw[flip] ^= 0x01;
    let changed = zstd::encode_all(&raw[..], 3).unwrap();
    let target = p.dir.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(TARGET_DISK)
        .unwrap();
    let text = std::fs::read(p.image.join("manifest.toml")).unwrap();
    let sig = std::fs::read_to_string(p.image.join("manifest.toml.sig")).unwrap();
    let signed = check_signed(&text, &sig, &AllowedSigners::load(&p.signers).unwrap()).unwrap();
    let mut source = ChangingSource {
        checked: image,
        changed,
        opens: 0,
    };
    let mut messages = Vec::new();
    let e = deploy(
        &signed,
        &mut source,
        &target,
        &DeployOptions {
            grow: true,
            precheck: true,
        },
        &mut |e| {
            if let kiln_agent::EventKind::Message(m) = &e.kind {
                messages.push(m.clone());
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert_eq!(source.opens, 2);
    let msg = e.to_string();
    let want = format!(
        "range {index} (bytes {}..{}) has BLAKE3 ",
        r.offset,
        r.offset + r.length
    );
    assert!(msg.contains(&want), "expected {want:?} in {msg:?}");
    assert!(
        msg.contains(&format!("the signed manifest says {}", r.blake3)),
        "{msg}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("wiping the partition table")),
        "{messages:?}"
    );
    assert!(table_wiped(&target), "the partition table survived");
    // The backup GPT the image put at the end of its own 40 MiB is gone too.
    let data = std::fs::read(&target).unwrap();
    let end = IMAGE_DISK as usize;
    assert!(data[end - 33 * 512..end].iter().all(|&b| b == 0));
    // The partition-table area was never written.
    assert!(data[..MIB as usize].iter().all(|&b| b == 0));
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}
