//! `kiln-master export` with the real tools: the agent captures a disk with
//! a GPT and an ext4 holding files, the image is published into a spool,
//! exported, then flashed by `bmaptool copy` and compared by `qemu-img
//! compare`. A missing tool fails the test and says which package has it.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kiln_spool::manifest::ImageManifest;
use kiln_spool::signature::{SigningKey, DEFAULT_PRINCIPAL};
use kiln_spool::spool::image_dir;
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{Published, IMAGE_FILE, MANIFEST, PUBLISHED, SIGNATURE};
use kiln_spool::LocalSpool;
use tempfile::TempDir;

mod kiln_cli;
use kiln_cli::kiln;

const ID: &str = "web-01";
const DISK_SIZE: u64 = 64 << 20;
/// What the flash target holds before: anything a real disk might.
const PATTERN: u8 = 0xa5;

/// Fails, naming the package, when `program` is not installed.
fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "the export tests run {program}, which is not in PATH: install {package} (scripts/install-deps.sh does)"
    );
}

fn argv(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`, which must succeed; returns its output.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", argv(cmd)));
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout: {}\nstderr: {}",
        argv(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// `kiln-agent`: `$KILN_AGENT_HOST`, or built (debug) the first time.
fn kiln_agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| match std::env::var_os("KILN_AGENT_HOST") {
            Some(p) => PathBuf::from(p),
            None => {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                ok(Command::new(cargo)
                    .args(["build", "-p", "kiln-agent"])
                    .current_dir(env!("CARGO_MANIFEST_DIR")));
                target_dir().join("debug/kiln-agent")
            }
        })
        .clone()
}

/// Bytes that do not compress: what files with real data look like.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A loop device on a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = ok(Command::new("losetup").args(["-f", "--show"]).arg(file));
        Loop(text(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..10 {
            match Command::new("losetup").args(["-d", &self.0]).status() {
                Ok(s) if s.success() => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        eprintln!(
            "detaching {} failed; `losetup -d {}` frees it",
            self.0, self.0
        );
    }
}

/// A source disk, its image captured by the agent and published (and
/// signed) in a spool.
struct Fixture {
    dir: TempDir,
    disk: PathBuf,
    spool: PathBuf,
    manifest: ImageManifest,
    signers: PathBuf,
    /// The spool's own signing key, which signed the publication.
    key: SigningKey,
}

impl Fixture {
    fn new() -> Fixture {
        need("sfdisk", "fdisk");
        need("mkfs.ext4", "e2fsprogs");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // A GPT with one Linux partition at 1 MiB, an ext4 in it holding
        // files of noise and of text. A small ext4 has 1 KiB blocks, so the
        // image's ranges are not all on 4 KiB blocks.
        let disk = d.join("disk.img");
        fs::File::create(&disk).unwrap().set_len(DISK_SIZE).unwrap();
        let mut sfdisk = Command::new("sfdisk");
        sfdisk.args(["-q"]).arg(&disk);
        let mut child = sfdisk
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("running sfdisk");
        std::io::Write::write_all(
            child.stdin.as_mut().unwrap(),
            b"label: gpt\nstart=2048, size=100000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        )
        .unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "sfdisk on {disk:?} failed");
        let root = d.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("var/lib/app")).unwrap();
        fs::write(root.join("etc/hostname"), "web-01\n").unwrap();
        let numbers: String = (0..50_000).map(|i| format!("{i}\n")).collect();
        fs::write(root.join("etc/numbers"), numbers).unwrap();
        fs::write(root.join("var/lib/app/data.bin"), noise(3 << 20, 7)).unwrap();
        fs::write(root.join("var/lib/app/small.bin"), noise(5000, 11)).unwrap();
        let ext4 = d.join("ext4.img");
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&ext4)
            .arg("48M"));
        let fs_bytes = fs::read(&ext4).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all_at(&fs_bytes, 1 << 20)
            .unwrap();
        fs::remove_file(&ext4).unwrap();

        let captured = d.join("captured");
        fs::create_dir(&captured).unwrap();
        let image = captured.join("image");
        ok(Command::new(kiln_agent())
            .args(["capture", "--disk"])
            .arg(&disk)
            .arg("--out")
            .arg(&image));
        // The master publishes an image under its job's id.
        let manifest_text = fs::read_to_string(captured.join("image.manifest.toml"))
            .unwrap()
            .replacen("job = \"\"", &format!("job = \"{ID}\""), 1);
        let manifest = ImageManifest::parse(&manifest_text).unwrap();
        assert!(
            manifest.ranges.iter().any(|r| r.offset % 4096 != 0),
            "the fixture should hold ranges off 4 KiB blocks: {:?}",
            manifest.ranges
        );

        // Published as the master does: images/<id>/ with the image, its
        // manifest, the signature and the record.
        let spool = d.join("spool");
        fs::create_dir(&spool).unwrap();
        let s = LocalSpool::new(&spool);
        kiln_spool::master::init(&s).unwrap();
        let pub_dir = s.path(&image_dir(ID));
        fs::create_dir_all(&pub_dir).unwrap();
        fs::copy(&image, pub_dir.join(IMAGE_FILE)).unwrap();
        fs::write(pub_dir.join(MANIFEST), &manifest_text).unwrap();
        let key = kiln_spool::master::signing::load_or_create_key(&s)
            .unwrap()
            .0;
        fs::write(
            pub_dir.join(SIGNATURE),
            key.sign(manifest_text.as_bytes()).unwrap(),
        )
        .unwrap();
        let signers = d.join("allowed_signers");
        fs::write(
            &signers,
            format!("{}\n", key.allowed_signers_line(DEFAULT_PRINCIPAL)),
        )
        .unwrap();
        let record = Published {
            job: ID.into(),
            token: "0123456789abcdef".into(),
            agent: "agent-a".into(),
            published: Timestamp::now(),
            image_size: manifest.image_size,
            image_blake3: manifest.image_blake3.clone(),
            disk_size: manifest.disk_size,
        };
        fs::write(pub_dir.join(PUBLISHED), record.to_toml()).unwrap();
        Fixture {
            dir,
            disk,
            spool,
            manifest,
            signers,
            key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn published(&self, name: &str) -> PathBuf {
        self.spool.join(image_dir(ID)).join(name)
    }

    fn export(&self, out: &Path, flags: &[&str]) -> Output {
        let mut args = vec!["export", ID, "--out", out.to_str().unwrap()];
        args.extend_from_slice(flags);
        kiln(&self.spool, &args)
    }

    /// Exports, which must succeed and say on stderr how far it got and
    /// how fast; returns stdout.
    fn export_ok(&self, out: &Path, flags: &[&str]) -> String {
        let o = self.export(out, flags);
        let err = text(&o.stderr);
        assert!(
            o.status.success(),
            "export {flags:?} failed ({}): {err}",
            o.status
        );
        assert!(
            err.contains("export: reading the image: 64.0 MiB of 64.0 MiB (100%)")
                && err.contains("MiB/s"),
            "progress on stderr: {err}"
        );
        text(&o.stdout)
    }

    /// Asserts that `target` holds the source disk's bytes on every data
    /// range of the manifest.
    fn assert_ranges_match(&self, target: &Path) {
        let src = fs::File::open(&self.disk).unwrap();
        let dst = fs::File::open(target).unwrap();
        for (i, r) in self.manifest.ranges.iter().enumerate() {
            let mut a = vec![0u8; r.length as usize];
            let mut b = vec![0u8; r.length as usize];
            src.read_exact_at(&mut a, r.offset).unwrap();
            dst.read_exact_at(&mut b, r.offset).unwrap();
            assert!(
                a == b,
                "range {i} (bytes {}..{}) of {} differs from the source disk",
                r.offset,
                r.offset + r.length,
                target.display()
            );
        }
    }

    /// A byte far from every data range (and the blocks around them).
    fn unmapped_offset(&self) -> u64 {
        let mut at = 0;
        let mut gap = 0;
        let mut prev_end = 0;
        for r in &self.manifest.ranges {
            if r.offset - prev_end > gap {
                gap = r.offset - prev_end;
                at = prev_end + gap / 2;
            }
            prev_end = r.offset + r.length;
        }
        assert!(gap > 1 << 20, "the fixture should have a gap of zeros");
        at
    }
}

fn fill(path: &Path, byte: u8, len: u64) {
    let f = fs::File::create(path).unwrap();
    let block = vec![byte; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(block.len() as u64) as usize;
        f.write_all_at(&block[..n], at).unwrap();
        at += n as u64;
    }
}

fn byte_at(path: &Path, at: u64) -> u8 {
    let mut b = [0u8];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b[0]
}

#[test]
fn bmaptool_flashes_the_exported_image_onto_a_disk() {
    need("bmaptool", "bmap-tools");
    need("losetup", "util-linux");
    let fx = Fixture::new();
    let out = fx.path("out");
    let stdout = fx.export_ok(&out, &["--bmap"]);

    let img = out.join(format!("{ID}.img.zst"));
    let bmap = out.join(format!("{ID}.img.bmap"));
    assert!(
        stdout.contains(&format!("bmaptool copy {} /dev/sdX", img.display())),
        "{stdout}"
    );
    assert!(stdout.contains(&bmap.display().to_string()), "{stdout}");
    assert_eq!(
        fs::read(&img).unwrap(),
        fs::read(fx.published(IMAGE_FILE)).unwrap(),
        "the .img.zst is the image as published"
    );
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only the image and its bmap: {names:?}");

    // A disk that held something else: bmaptool writes the mapped blocks
    // and leaves the rest.
    let target = fx.path("target.img");
    fill(&target, PATTERN, DISK_SIZE);
    {
        let dev = Loop::attach(&target);
        let copied = ok(Command::new("bmaptool").arg("copy").arg(&img).arg(&dev.0));
        let log = text(&copied.stderr);
        assert!(
            log.contains(&format!("discovered bmap file '{}'", bmap.display())),
            "bmaptool finds the bmap beside the image by itself: {log}"
        );
    }
    fx.assert_ranges_match(&target);
    assert_eq!(
        byte_at(&target, fx.unmapped_offset()),
        PATTERN,
        "bmaptool wrote only the mapped blocks"
    );

    // kiln's own deploy of the published image onto the same kind of disk
    // gives the same bytes on every data range.
    let deployed = fx.path("deployed.img");
    fill(&deployed, PATTERN, DISK_SIZE);
    {
        let dev = Loop::attach(&deployed);
        ok(Command::new(kiln_agent())
            .args(["deploy", "--image"])
            .arg(fx.spool.join(image_dir(ID)))
            .arg("--disk")
            .arg(&dev.0)
            .arg("--signers")
            .arg(&fx.signers));
    }
    let (a, b) = (
        fs::File::open(&target).unwrap(),
        fs::File::open(&deployed).unwrap(),
    );
    for (i, r) in fx.manifest.ranges.iter().enumerate() {
        let mut x = vec![0u8; r.length as usize];
        let mut y = vec![0u8; r.length as usize];
        a.read_exact_at(&mut x, r.offset).unwrap();
        b.read_exact_at(&mut y, r.offset).unwrap();
        assert!(
            x == y,
            "range {i} (bytes {}..{}) differs between bmaptool copy and kiln-agent deploy",
            r.offset,
            r.offset + r.length
        );
    }
}

#[test]
fn bmaptool_refuses_an_exported_image_with_one_range_changed() {
    need("bmaptool", "bmap-tools");
    let fx = Fixture::new();
    let out = fx.path("out");
    let stdout = fx.export_ok(&out, &["--bmap", "--raw"]);
    let img = out.join(format!("{ID}.img"));
    assert!(
        stdout.contains(&format!("bmaptool copy {} /dev/sdX", img.display())),
        "{stdout}"
    );

    // The raw export is the source disk, with its zeros left as holes.
    assert_eq!(
        fs::read(&img).unwrap(),
        fs::read(&fx.disk).unwrap(),
        "{} is the source disk",
        img.display()
    );
    let allocated = fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        allocated < DISK_SIZE / 4,
        "{} is sparse: {allocated} bytes allocated of {DISK_SIZE}",
        img.display()
    );

    // Flashes whole, then not after one byte of the largest range changes.
    let target = fx.path("target.img");
    ok(Command::new("bmaptool").arg("copy").arg(&img).arg(&target));
    fx.assert_ranges_match(&target);

    let r = fx.manifest.ranges.iter().max_by_key(|r| r.length).unwrap();
    let at = r.offset + r.length / 2;
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[!byte_at(&img, at)], at).unwrap();
    drop(f);
    let o = Command::new("bmaptool")
        .arg("copy")
        .arg(&img)
        .arg(fx.path("target2.img"))
        .output()
        .unwrap();
    let log = text(&o.stderr);
    assert!(
        !o.status.success(),
        "bmaptool copied a changed image: {log}"
    );
    assert!(log.contains("checksum mismatch"), "{log}");
}

#[test]
fn the_qcow2_export_is_the_same_disk() {
    need("qemu-img", "qemu-utils");
    let fx = Fixture::new();
    let out = fx.path("out");
    let stdout = fx.export_ok(&out, &["--qcow2"]);
    let qcow2 = out.join(format!("{ID}.qcow2"));
    assert!(
        stdout.contains(&format!(
            "qemu-system-x86_64 -m 2G -drive file={}",
            qcow2.display()
        )),
        "{stdout}"
    );
    let info = ok(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], DISK_SIZE, "{info}");
    let cmp = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&fx.disk)
        .arg(&qcow2));
    assert!(text(&cmp.stdout).contains("Images are identical"));
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [format!("{ID}.qcow2")],
        "the temporary raw disk is removed"
    );

    // All at once: the sparse raw disk, its bmap and the qcow2 made from it.
    let all = fx.path("all");
    let stdout = fx.export_ok(&all, &["--bmap", "--raw", "--qcow2"]);
    let mut names = entries(&all);
    names.sort();
    assert_eq!(
        names,
        [
            format!("{ID}.img"),
            format!("{ID}.img.bmap"),
            format!("{ID}.qcow2")
        ],
        "{stdout}"
    );
    let cmp = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(all.join(format!("{ID}.img")))
        .arg(all.join(format!("{ID}.qcow2"))));
    assert!(text(&cmp.stdout).contains("Images are identical"));
}

fn assert_fails(o: &Output, words: &[&str]) -> String {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "export succeeded: {}", text(&o.stdout));
    for w in words {
        assert!(err.contains(w), "the error names {w:?}: {err}");
    }
    err
}

fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn export_refuses_what_is_not_a_checked_published_image() {
    let fx = Fixture::new();
    let out = fx.path("out");

    let o = kiln(&fx.spool, &["export", "db-02", "--out", "x", "--bmap"]);
    assert_fails(&o, &["db-02 is not a published image", "published.toml"]);
    let o = kiln(&fx.spool, &["export", "../etc", "--out", "x", "--bmap"]);
    assert_fails(&o, &["image id"]);
    let o = fx.export(&out, &[]);
    assert_fails(&o, &["--bmap", "--qcow2"]);

    // Files already there stay unless --force.
    fx.export_ok(&out, &["--bmap"]);
    let o = fx.export(&out, &["--bmap"]);
    let img = out.join(format!("{ID}.img.zst"));
    assert_fails(
        &o,
        &[&format!("{} already exists", img.display()), "--force"],
    );
    fx.export_ok(&out, &["--bmap", "--force"]);

    // A manifest changed after signing: refused, naming the signature.
    let published = fx.published(MANIFEST);
    let good = fs::read_to_string(&published).unwrap();
    let r = &fx.manifest.ranges[1];
    let changed = good.replace(&r.blake3, &"0".repeat(64));
    fs::write(&published, &changed).unwrap();
    let fresh = fx.path("fresh");
    let o = fx.export(&fresh, &["--bmap"]);
    assert_fails(&o, &[MANIFEST, SIGNATURE, "changed after signing"]);
    assert_eq!(entries(&fresh), Vec::<String>::new());

    // A signed manifest whose range the image does not hold: named, and
    // nothing written.
    let sig = fx.published(SIGNATURE);
    let good_sig = fs::read_to_string(&sig).unwrap();
    fs::write(&sig, fx.key.sign(changed.as_bytes()).unwrap()).unwrap();
    let o = fx.export(&fresh, &["--bmap", "--qcow2"]);
    assert_fails(
        &o,
        &[
            &format!("data range 1 (bytes {}..{})", r.offset, r.offset + r.length),
            "nothing was exported",
        ],
    );
    assert_eq!(entries(&fresh), Vec::<String>::new());
    fs::write(&published, &good).unwrap();
    fs::write(&sig, &good_sig).unwrap();

    // One byte more in the compressed file: its BLAKE3 no longer matches.
    let image = fx.published(IMAGE_FILE);
    let mut bytes = fs::read(&image).unwrap();
    bytes.push(0);
    fs::write(&image, &bytes).unwrap();
    let o = fx.export(&fresh, &["--bmap"]);
    assert_fails(&o, &[IMAGE_FILE, "BLAKE3", "nothing was exported"]);
    assert_eq!(entries(&fresh), Vec::<String>::new());
    bytes.pop();
    fs::write(&image, &bytes).unwrap();

    // --qcow2 without qemu-img says what to install, before writing.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln-master"))
        .arg("--spool")
        .arg(&fx.spool)
        .args(["export", ID, "--qcow2", "--out"])
        .arg(&fresh)
        .env("PATH", fx.path("empty"))
        .output()
        .unwrap();
    assert_fails(&o, &["qemu-img", "qemu-utils"]);
    assert_eq!(entries(&fresh), Vec::<String>::new());
}
