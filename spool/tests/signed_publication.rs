//! Publication signs the manifest and fills in what only the master can
//! vouch for; what an agent reports of itself is bounded; deploy jobs are
//! pinned to a publication and recorded when the agent reports them done.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_spool::agent::claim::claim_next;
use kiln_spool::lease::Lease;
use kiln_spool::manifest::{Hardware, ImageManifest, Nic, PhaseTime, Provenance};
use kiln_spool::master::deploy::deployments_of;
use kiln_spool::master::provenance::{master_signers, read_image, verify_image, SignatureCheck};
use kiln_spool::master::signing::load_key;
use kiln_spool::master::{self, job_view, reap, JobState};
use kiln_spool::queue::{read_job_list, EntryState};
use kiln_spool::signature::AllowedSigners;
use kiln_spool::spool::{history_path, image_dir, incoming_dir, job_path, lease_path, SIGNING_KEY};
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{DeployReport, DEPLOYED, IMAGE_FILE, MANIFEST, SIGNATURE};
use kiln_spool::{LocalSpool, SpoolFs};

mod upload_fixture;
use upload_fixture::upload_with;

const T0: Timestamp = Timestamp(1_900_000_000);
const T1: Timestamp = Timestamp(1_900_000_100);

fn new_spool() -> (tempfile::TempDir, LocalSpool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = LocalSpool::new(dir.path());
    master::init(&spool).unwrap();
    (dir, spool)
}

fn add_build(spool: &LocalSpool, id: &str) {
    let text = format!(
        "id = \"{id}\"\nmax_attempts = 3\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
    );
    master::add_job(spool, &text, Path::new("build.toml"), T0).unwrap();
}

fn claim(spool: &LocalSpool) -> Lease {
    claim_next(spool, "n7", T0).unwrap().unwrap()
}

fn honest_provenance() -> Provenance {
    Provenance {
        kiln_version: "0.9.0".into(),
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
    }
}

/// Publishes a build job `id` whose agent reported `edit`'s manifest.
fn publish(spool: &LocalSpool, id: &str, edit: impl FnOnce(&mut ImageManifest)) {
    add_build(spool, id);
    let lease = claim(spool);
    assert_eq!(lease.job, id);
    upload_with(spool, &lease, b"an image", 8, |m| {
        m.provenance = Some(honest_provenance());
        m.phases = vec![PhaseTime {
            name: "capture".into(),
            seconds: 12.5,
            started: Some(T0),
        }];
        edit(m);
    });
    let report = reap(spool, T1).unwrap();
    assert_eq!(report.published, vec![id.to_string()], "{report:?}");
}

fn published_manifest(spool: &LocalSpool, id: &str) -> (Vec<u8>, ImageManifest) {
    let bytes = spool
        .read(&format!("{}/{MANIFEST}", image_dir(id)))
        .unwrap();
    let m = ImageManifest::parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
    (bytes, m)
}

#[test]
fn a_publication_is_signed_and_carries_the_masters_provenance() {
    let (dir, spool) = new_spool();
    assert!(load_key(&spool).unwrap().is_none());
    add_build(&spool, "img");
    let lease = claim(&spool);
    upload_with(&spool, &lease, b"an image", 8, |m| {
        m.provenance = Some(honest_provenance())
    });
    let report = reap(&spool, T1).unwrap();
    assert_eq!(report.published, vec!["img".to_string()]);
    // The first publication made the key, said so, and keeps it private.
    assert!(
        report.notes.iter().any(|n| n.contains(SIGNING_KEY)),
        "{report:?}"
    );
    let mode = std::fs::metadata(dir.path().join(SIGNING_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = load_key(&spool).unwrap().unwrap();

    let (bytes, m) = published_manifest(&spool, "img");
    let p = m.provenance.unwrap();
    let job_text = String::from_utf8(spool.read(&job_path("img")).unwrap()).unwrap();
    assert_eq!(p.job_text, job_text);
    assert_eq!(
        blake3::hash(job_text.as_bytes()).to_hex().as_str(),
        m.job_blake3
    );
    assert_eq!(p.signer, key.fingerprint());
    assert_eq!(p.published, Some(T1));
    assert_eq!(p.publisher_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(p.hardware, honest_provenance().hardware);

    let signers = AllowedSigners::parse(&key.allowed_signers_line("kiln-master")).unwrap();
    let sig = String::from_utf8(
        spool
            .read(&format!("{}/{SIGNATURE}", image_dir("img")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(signers.verify(&bytes, &sig).unwrap(), key.fingerprint());
    let mut changed = bytes.clone();
    changed[10] ^= 1;
    assert!(signers.verify(&changed, &sig).is_err());

    // The key stays: a second publication is signed by the same one.
    publish(&spool, "img2", |_| {});
    let (_, m2) = published_manifest(&spool, "img2");
    assert_eq!(m2.provenance.unwrap().signer, key.fingerprint());
}

#[test]
fn an_agent_cannot_set_what_only_the_master_sets() {
    let (_dir, spool) = new_spool();
    publish(&spool, "img", |m| {
        let p = m.provenance.as_mut().unwrap();
        p.job_text = "id = \"something-else\"\n".into();
        p.signer = "SHA256:forged".into();
        p.publisher_version = "99.0".into();
        p.published = Some(Timestamp(1));
    });
    let (_, m) = published_manifest(&spool, "img");
    let p = m.provenance.unwrap();
    let key = load_key(&spool).unwrap().unwrap();
    assert!(p.job_text.starts_with("id = \"img\""), "{}", p.job_text);
    assert_eq!(p.signer, key.fingerprint());
    assert_eq!(p.publisher_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(p.published, Some(T1));
}

#[test]
fn what_an_agent_says_of_the_machine_is_bounded() {
    type Lie = fn(&mut ImageManifest);
    fn hw(m: &mut ImageManifest) -> &mut Hardware {
        &mut m.provenance.as_mut().unwrap().hardware
    }
    let cases: Vec<(Lie, &str)> = vec![
        (|m| hw(m).vendor = "v".repeat(300), "hardware.vendor"),
        (
            |m| hw(m).product = "PC\u{1b}[2J".into(),
            "hardware.product holds a control character",
        ),
        (
            |m| hw(m).nics[0].mac = "52:54:00:12:34".into(),
            "hardware.nics[0].mac",
        ),
        (
            |m| {
                let nic = hw(m).nics[0].clone();
                hw(m).nics = vec![nic; 65]
            },
            "hardware.nics has 65 entries",
        ),
        (
            |m| m.provenance.as_mut().unwrap().kiln_version = "9".repeat(100),
            "provenance.kiln_version",
        ),
        (
            |m| {
                m.phases = vec![
                    PhaseTime {
                        name: "p".into(),
                        seconds: 1.0,
                        started: None
                    };
                    65
                ]
            },
            "phases has 65 entries",
        ),
        (
            |m| {
                m.phases = vec![PhaseTime {
                    name: "p".into(),
                    seconds: -1.0,
                    started: None,
                }]
            },
            "phases[0].seconds",
        ),
        (
            |m| {
                m.payloads = vec![kiln_spool::manifest::PayloadHash {
                    name: "rootkit.tar".into(),
                    blake3: "00".repeat(32),
                }]
            },
            "is not a payload jobs/bad.toml pins",
        ),
    ];
    for (lie, want) in cases {
        let (_dir, spool) = new_spool();
        add_build(&spool, "bad");
        let lease = claim(&spool);
        upload_with(&spool, &lease, b"an image", 8, |m| {
            m.provenance = Some(honest_provenance());
            lie(m);
        });
        let report = reap(&spool, T1).unwrap();
        assert!(report.published.is_empty(), "{want}: published");
        let (_, _, why) = report
            .refused
            .first()
            .unwrap_or_else(|| panic!("{want}: not refused: {report:?}"));
        assert!(why.contains(want), "{want}: {why}");
        assert!(!spool.exists(&image_dir("bad")).unwrap());
        let e = read_job_list(&spool).unwrap().get("bad").cloned().unwrap();
        assert_eq!((e.state, e.attempts), (EntryState::Queued, 1), "{want}");
    }
}

fn add_deploy(spool: &LocalSpool, id: &str, image: &str, extra: &str) -> master::Result<()> {
    let text = format!(
        "id = \"{id}\"\nkind = \"deploy\"\npriority = 900\n[deploy]\nimage = \"{image}\"\n{extra}"
    );
    master::add_job(spool, &text, Path::new("deploy.toml"), T0).map(|_| ())
}

fn report_for(lease: &Lease, image: &str, manifest_blake3: &str) -> DeployReport {
    DeployReport {
        job: lease.job.clone(),
        image: image.into(),
        manifest_blake3: manifest_blake3.into(),
        image_blake3: blake3::hash(b"an image").to_hex().to_string(),
        agent: lease.agent.clone(),
        disk: "/dev/vda".into(),
        disk_size: 16 << 30,
        grown: true,
        bytes_written: 8,
        started: T0,
        finished: T1,
        phases: vec![PhaseTime {
            name: "deploy".into(),
            seconds: 3.0,
            started: Some(T0),
        }],
        hardware: honest_provenance().hardware,
    }
}

fn write_report(spool: &LocalSpool, lease: &Lease, r: &DeployReport) {
    let dir = incoming_dir(&lease.job, &lease.token);
    spool.mkdir_all(&dir).unwrap();
    spool
        .write_atomic(&format!("{dir}/{DEPLOYED}"), r.to_toml().as_bytes())
        .unwrap();
}

#[test]
fn a_deploy_job_needs_a_published_image_and_is_pinned_to_it() {
    let (_dir, spool) = new_spool();
    let e = add_deploy(&spool, "d1", "nope", "")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deploy.toml")
            && e.contains("deploy.image")
            && e.contains("images/nope/published.toml"),
        "{e}"
    );
    publish(&spool, "img", |_| {});
    let e = add_deploy(
        &spool,
        "d1",
        "img",
        &format!("manifest_blake3 = \"{}\"\n", "ab".repeat(32)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("deploy.manifest_blake3"), "{e}");
    add_deploy(&spool, "d1", "img", "").unwrap();
    let record = read_image(&spool, "img").unwrap().unwrap();
    let job = String::from_utf8(spool.read(&job_path("d1")).unwrap()).unwrap();
    assert!(
        job.contains(&format!("manifest_blake3 = \"{}\"", record.manifest_blake3)),
        "{job}"
    );
}

#[test]
fn a_finished_deploy_is_recorded_with_its_report() {
    let (_dir, spool) = new_spool();
    publish(&spool, "img", |_| {});
    add_deploy(&spool, "d1", "img", "").unwrap();
    let pin = read_image(&spool, "img").unwrap().unwrap().manifest_blake3;
    let lease = claim(&spool);
    assert_eq!(lease.job, "d1");
    // A pass while the agent works leaves it alone.
    let report = reap(&spool, T1).unwrap();
    assert!(
        report.deployed.is_empty() && report.released.is_empty(),
        "{report:?}"
    );
    let r = report_for(&lease, "img", &pin);
    write_report(&spool, &lease, &r);
    let report = reap(&spool, T1).unwrap();
    assert_eq!(
        report.deployed,
        vec![("d1".to_string(), "img".to_string(), "n7".to_string())]
    );
    assert!(report
        .lines()
        .contains(&"deployed img onto n7 (d1)".to_string()));
    assert_eq!(job_view(&spool, "d1", T1).unwrap().state, JobState::Done);
    let h = master::HistoryRecord::parse(
        &String::from_utf8(spool.read(&history_path("d1")).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(h.deployment.as_ref(), Some(&r));
    assert!(!spool.exists(&lease_path("d1")).unwrap());
    assert!(!spool.exists("incoming/d1").unwrap());
    let deployed = deployments_of(&spool, "img").unwrap();
    assert_eq!(deployed.len(), 1);
    assert_eq!(deployed[0].entry.id, "d1");
    assert!(deployments_of(&spool, "other").unwrap().is_empty());
}

#[test]
fn a_deploy_report_for_another_publication_or_image_is_refused() {
    for (image, manifest_blake3, want) in [
        ("img", "cd".repeat(32), "not the publication the job pins"),
        ("other", String::new(), "image \"other\" is not \"img\""),
        ("img", "../x".into(), "manifest_blake3"),
    ] {
        let (_dir, spool) = new_spool();
        publish(&spool, "img", |_| {});
        add_deploy(&spool, "d1", "img", "").unwrap();
        let pin = read_image(&spool, "img").unwrap().unwrap().manifest_blake3;
        let lease = claim(&spool);
        let hash = if manifest_blake3.is_empty() {
            pin
        } else {
            manifest_blake3.clone()
        };
        write_report(&spool, &lease, &report_for(&lease, image, &hash));
        let report = reap(&spool, T1).unwrap();
        assert!(report.deployed.is_empty(), "{want}");
        let (_, _, why) = report.refused.first().expect("refused");
        assert!(
            why.contains(want) && why.contains(DEPLOYED),
            "{want}: {why}"
        );
        assert!(!spool.exists(&history_path("d1")).unwrap());
        let e = read_job_list(&spool).unwrap().get("d1").cloned().unwrap();
        assert_eq!((e.state, e.attempts), (EntryState::Queued, 1));
    }
}

#[test]
fn verify_checks_signature_manifest_and_image() {
    let (dir, spool) = new_spool();
    publish(&spool, "img", |_| {});
    let signers = master_signers(&spool).unwrap();
    let ok = verify_image(&spool, "img", &signers).unwrap().unwrap();
    assert_eq!(ok.image_blake3, blake3::hash(b"an image").to_hex().as_str());
    let record = read_image(&spool, "img").unwrap().unwrap();
    assert_eq!(
        record.check_signature(&signers),
        SignatureCheck::Valid(load_key(&spool).unwrap().unwrap().fingerprint())
    );

    let image = dir.path().join(image_dir("img")).join(IMAGE_FILE);
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&image, &bytes).unwrap();
    let why = verify_image(&spool, "img", &signers).unwrap().unwrap_err();
    assert!(
        why.contains(IMAGE_FILE) && why.contains("image_blake3"),
        "{why}"
    );

    // Another key's signers refuse a good signature.
    let other = kiln_spool::signature::SigningKey::generate("x").unwrap();
    let theirs = AllowedSigners::parse(&other.allowed_signers_line("someone")).unwrap();
    let why = verify_image(&spool, "img", &theirs).unwrap().unwrap_err();
    assert!(why.contains(SIGNATURE), "{why}");
}

#[test]
fn without_a_usable_key_nothing_is_published_and_the_upload_waits() {
    let (dir, spool) = new_spool();
    std::fs::write(dir.path().join(SIGNING_KEY), "not a key").unwrap();
    add_build(&spool, "img");
    let lease = claim(&spool);
    upload_with(&spool, &lease, b"an image", 8, |_| {});
    let e = reap(&spool, T1).unwrap_err().to_string();
    assert!(e.starts_with(SIGNING_KEY), "{e}");
    assert!(!spool.exists(&image_dir("img")).unwrap());
    // The agent's attempt is not spent and its upload is kept.
    let entry = read_job_list(&spool).unwrap().get("img").cloned().unwrap();
    assert_eq!((entry.state, entry.attempts), (EntryState::Queued, 0));
    assert!(spool
        .exists(&format!(
            "{}/{MANIFEST}",
            incoming_dir(&lease.job, &lease.token)
        ))
        .unwrap());
    // The operator puts a key back; the next pass publishes, signed.
    std::fs::remove_file(dir.path().join(SIGNING_KEY)).unwrap();
    let report = reap(&spool, T1).unwrap();
    assert_eq!(report.published, vec!["img".to_string()]);
    let record = read_image(&spool, "img").unwrap().unwrap();
    assert!(matches!(
        record.check_signature(&master_signers(&spool).unwrap()),
        SignatureCheck::Valid(_)
    ));
}
