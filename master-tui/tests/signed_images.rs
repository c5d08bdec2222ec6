//! Signed images through the real `kiln-master`: an image published by
//! `reap` verifies with stock `ssh-keygen -Y verify` and the line `signer`
//! prints, and is refused once one byte of its manifest changes; `verify`
//! refuses a changed image; `show` prints the provenance; a deploy job is
//! pinned to the publication and its completion is recorded and shown.

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_spool::agent::claim::claim_next;
use kiln_spool::lease::Lease;
use kiln_spool::manifest::{Hardware, Nic, PhaseTime, Provenance};
use kiln_spool::spool::incoming_dir;
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{DeployReport, DEPLOYED};
use kiln_spool::{LocalSpool, SpoolFs};
use serde_json::Value;

mod kiln_cli;
use kiln_cli::{kiln, kiln_ok as ok};

#[path = "../../spool/tests/upload_fixture/mod.rs"]
mod upload_fixture;

const T0: Timestamp = Timestamp(1_900_000_000);

/// Runs `kiln-master`, expects exit `code`, returns stderr.
fn fails(spool: &Path, args: &[&str], code: i32) -> String {
    let out = kiln(spool, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "kiln-master {args:?}: {stderr}"
    );
    stderr
}

/// `ssh-keygen -Y verify` of `images/<id>/manifest.toml` with `allowed`.
fn ssh_keygen_verify(spool: &Path, id: &str, allowed: &Path) -> (bool, String) {
    let dir = spool.join("images").join(id);
    let out = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(allowed)
        .args(["-I", "kiln-master", "-n", "kiln-image", "-s"])
        .arg(dir.join("manifest.toml.sig"))
        .stdin(Stdio::from(
            std::fs::File::open(dir.join("manifest.toml")).unwrap(),
        ))
        .output()
        .expect("running ssh-keygen");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn claim(spool: &Path) -> Lease {
    claim_next(&LocalSpool::new(spool), "n7", T0)
        .unwrap()
        .expect("a job to claim")
}

const BUILD_JOB: &str = "id = \"img\"\n\
    [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";

/// Publishes job "img" through `add`, an agent's upload and `reap`.
fn publish(spool: &Path, work: &Path) {
    let file = work.join("img.toml");
    std::fs::write(&file, BUILD_JOB).unwrap();
    ok(spool, &["add", file.to_str().unwrap()]);
    let lease = claim(spool);
    upload_fixture::upload_with(
        &LocalSpool::new(spool),
        &lease,
        b"compressed image bytes",
        8,
        |m| {
            m.phases = vec![PhaseTime {
                name: "capture".into(),
                seconds: 42.5,
                started: Some(T0),
            }];
            m.provenance = Some(Provenance {
                kiln_version: "0.4.0".into(),
                hardware: Hardware {
                    vendor: "QEMU".into(),
                    product: "Standard PC (Q35 + ICH9, 2009)".into(),
                    cpu_model: "AMD EPYC 7763".into(),
                    cpus: 4,
                    memory_bytes: 4 << 30,
                    disk_model: "QEMU HARDDISK".into(),
                    disk_size: 8 << 30,
                    nics: vec![Nic {
                        name: "ens3".into(),
                        mac: "52:54:00:12:34:56".into(),
                    }],
                },
                ..Provenance::default()
            });
        },
    );
    assert!(ok(spool, &["reap"]).contains("published img"));
}

#[test]
fn a_published_image_verifies_with_ssh_keygen_until_a_byte_changes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let init = ok(&spool, &["init"]);
    assert!(
        init.contains("image signing key master/image-signing-key"),
        "{init}"
    );
    let key = std::fs::metadata(spool.join("master/image-signing-key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );

    let line = ok(&spool, &["signer"]);
    assert!(
        line.starts_with("kiln-master namespaces=\"kiln-image\" ssh-ed25519 AAAA"),
        "{line}"
    );
    let other = ok(&spool, &["signer", "--principal", "builds@lab"]);
    assert!(other.starts_with("builds@lab namespaces="), "{other}");
    let allowed = dir.path().join("allowed_signers");
    std::fs::write(&allowed, &line).unwrap();

    // `pxe` says what the agents' config needs for deploy jobs.
    let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("i.img"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    let pxe = ok(
        &spool,
        &[
            "pxe",
            "--out",
            dir.path().join("tftp").to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
        ],
    );
    assert!(
        pxe.contains(&format!("image_signers = ['{}']", line.trim_end())),
        "{pxe}"
    );

    publish(&spool, dir.path());
    let (good, said) = ssh_keygen_verify(&spool, "img", &allowed);
    assert!(good, "ssh-keygen refused a fresh publication: {said}");
    assert!(said.contains("Good \"kiln-image\" signature"), "{said}");

    let verified = ok(&spool, &["verify", "img"]);
    assert!(verified.contains("the signature verifies"), "{verified}");
    let with_file = ok(
        &spool,
        &["verify", "img", "--signers", allowed.to_str().unwrap()],
    );
    assert!(with_file.contains("allowed_signers"), "{with_file}");

    // One byte of the manifest (a digit of the disk's size, so that it
    // still parses): ssh-keygen and verify both refuse.
    let manifest = spool.join("images/img/manifest.toml");
    let original = std::fs::read(&manifest).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    let at = text.find("disk_size = 1").expect("the disk's size") + "disk_size = ".len();
    let mut changed = original.clone();
    changed[at] = b'2';
    std::fs::write(&manifest, &changed).unwrap();
    let (good, said) = ssh_keygen_verify(&spool, "img", &allowed);
    assert!(!good, "ssh-keygen took a changed manifest: {said}");
    let e = fails(&spool, &["verify", "img"], 1);
    assert!(e.contains("manifest.toml.sig does not verify"), "{e}");
    let shown = ok(&spool, &["show", "img"]);
    assert!(shown.contains("signature  does NOT verify"), "{shown}");
    // A manifest that no longer parses: verify still names the signature,
    // and show still shows the job.
    let mut garbled = original.clone();
    garbled.extend_from_slice(b"\n[[[\n");
    std::fs::write(&manifest, &garbled).unwrap();
    let e = fails(&spool, &["verify", "img"], 1);
    assert!(e.contains("manifest.toml.sig does not verify"), "{e}");
    let shown = ok(&spool, &["show", "img"]);
    assert!(
        shown.contains("state      done") && shown.contains("unreadable: images/img/manifest.toml"),
        "{shown}"
    );
    std::fs::write(&manifest, &original).unwrap();
    assert!(ssh_keygen_verify(&spool, "img", &allowed).0);

    // One byte of the image: the signature still holds, verify refuses.
    let image = spool.join("images/img/image.raw.zst");
    flip_byte(&image, 3);
    let e = fails(&spool, &["verify", "img"], 1);
    assert!(
        e.contains("images/img/image.raw.zst has BLAKE3") && e.contains("image_blake3"),
        "{e}"
    );
    flip_byte(&image, 3);
    ok(&spool, &["verify", "img"]);

    // A signers file with another key refuses a good signature.
    let stranger = dir.path().join("stranger");
    std::fs::write(
        &stranger,
        "kiln-master namespaces=\"kiln-image\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ4HGFFbJIzcFYiqQ7Xw87AS7OfcIyadz13nV7gnk1xR\n",
    )
    .unwrap();
    let e = fails(
        &spool,
        &["verify", "img", "--signers", stranger.to_str().unwrap()],
        1,
    );
    assert!(e.contains("not an allowed signer"), "{e}");
}

#[test]
fn show_prints_the_provenance_and_the_deployments() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    ok(&spool, &["init"]);
    publish(&spool, dir.path());
    let fingerprint = {
        let s = LocalSpool::new(&spool);
        kiln_spool::master::signing::load_key(&s)
            .unwrap()
            .unwrap()
            .fingerprint()
    };

    let shown = ok(&spool, &["show", "img"]);
    for want in [
        "# image",
        &format!("signer     {fingerprint}"),
        "signature  verifies",
        "agent      n7, kiln 0.4.0",
        "machine    QEMU Standard PC (Q35 + ICH9, 2009)",
        "cpu        AMD EPYC 7763 × 4",
        "memory     4.0 GiB",
        "disk       QEMU HARDDISK, 8.0 GiB",
        "nics       ens3 52:54:00:12:34:56",
        "capture           42.5s from",
        "  | id = \"img\"",
        "# deployments (0)",
    ] {
        assert!(shown.contains(want), "{want:?} missing:\n{shown}");
    }
    let json: Value = serde_json::from_str(&ok(&spool, &["show", "img", "--json"])).unwrap();
    assert_eq!(json["image"]["signature"]["verifies"], true);
    assert_eq!(
        json["image"]["manifest"]["provenance"]["signer"],
        fingerprint.as_str()
    );
    assert_eq!(
        json["image"]["manifest"]["provenance"]["job_text"],
        BUILD_JOB
    );

    // A deploy job for an image that is not published is refused, naming
    // the field and the file.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "id = \"d0\"\nkind = \"deploy\"\n[deploy]\nimage = \"nope\"\n",
    )
    .unwrap();
    let e = fails(&spool, &["add", bad.to_str().unwrap()], 2);
    assert!(
        e.contains("bad.toml")
            && e.contains("deploy.image")
            && e.contains("images/nope/published.toml"),
        "{e}"
    );

    let file = dir.path().join("deploy.toml");
    std::fs::write(
        &file,
        "id = \"d1\"\nkind = \"deploy\"\n[deploy]\nimage = \"img\"\n",
    )
    .unwrap();
    ok(&spool, &["add", file.to_str().unwrap()]);
    let json: Value = serde_json::from_str(&ok(&spool, &["show", "img", "--json"])).unwrap();
    let pin = json["image"]["manifest_blake3"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = std::fs::read_to_string(spool.join("jobs/d1.toml")).unwrap();
    assert!(
        spec.contains(&format!("manifest_blake3 = \"{pin}\"")),
        "{spec}"
    );

    let lease = claim(&spool);
    assert_eq!(lease.job, "d1");
    let report = DeployReport {
        job: "d1".into(),
        image: "img".into(),
        manifest_blake3: pin.clone(),
        image_blake3: json["image"]["manifest"]["image_blake3"]
            .as_str()
            .unwrap()
            .into(),
        agent: "n7".into(),
        disk: "/dev/vda".into(),
        disk_size: 16 << 30,
        grown: true,
        bytes_written: 22,
        started: T0,
        finished: Timestamp(T0.0 + 30),
        phases: vec![PhaseTime {
            name: "deploy".into(),
            seconds: 20.0,
            started: Some(T0),
        }],
        hardware: Hardware::default(),
    };
    let s = LocalSpool::new(&spool);
    let up = incoming_dir(&lease.job, &lease.token);
    s.mkdir_all(&up).unwrap();
    s.write_atomic(&format!("{up}/{DEPLOYED}"), report.to_toml().as_bytes())
        .unwrap();
    let reaped = ok(&spool, &["reap"]);
    assert!(reaped.contains("deployed img onto n7 (d1)"), "{reaped}");

    let d1 = ok(&spool, &["show", "d1"]);
    for want in [
        "state      done",
        "# deployment",
        "image      img",
        &format!("manifest   BLAKE3 {pin}"),
        "target     /dev/vda, 16.0 GiB, last partition grown to fill it",
    ] {
        assert!(d1.contains(want), "{want:?} missing:\n{d1}");
    }
    let img = ok(&spool, &["show", "img"]);
    assert!(img.contains("# deployments (1)"), "{img}");
    assert!(
        img.contains("d1  onto n7 /dev/vda (16.0 GiB, grown)"),
        "{img}"
    );
    let json: Value = serde_json::from_str(&ok(&spool, &["show", "d1", "--json"])).unwrap();
    assert_eq!(json["deployment"]["disk"], "/dev/vda");
}
