//! Builds that must fail: an escaping payload entry, a wrong payload hash,
//! a failing step, a step over its time limit. Each fails with a clear
//! message and leaves the disk without a partition table.

mod common;

use std::path::Path;

use common::*;

const LAYOUT: &str = r#"
[disk]
table = "gpt"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
"#;

fn setup(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("payloads")).unwrap();
    tmp
}

/// Runs a failing build and returns its stderr and job log.
fn fails(dir: &Path, job: &str, code: i32) -> (String, String) {
    let out = build(dir, job, "64MiB");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    let log = std::fs::read_to_string(dir.join("image.log")).unwrap_or_default();
    assert!(
        table_wiped(&dir.join("disk.img")),
        "the partition table survived: {stderr}"
    );
    assert!(!dir.join("image.raw.zst").exists());
    (stderr, log)
}

fn tar_with(path: &Path, f: impl FnOnce(&mut tar::Builder<std::fs::File>)) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    f(&mut b);
    b.into_inner().unwrap().sync_all().unwrap();
}

#[test]
fn a_dotdot_entry_is_refused() {
    if !can_run("a_dotdot_entry_is_refused") {
        return;
    }
    let tmp = setup("dotdot");
    let dir = tmp.path();
    tar_with(&dir.join("payloads/evil.tar"), |b| {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 4);
        // The tar crate refuses to write `..`; set the raw name.
        h.as_old_mut().name[..17].copy_from_slice(b"../../escaped-dot");
        h.set_cksum();
        b.append(&h, &b"bad\n"[..]).unwrap();
    });
    let job = format!("id = \"dotdot\"\n[[payloads]]\nname = \"evil.tar\"\n{LAYOUT}");
    let (stderr, log) = fails(dir, &job, 1);
    assert!(
        stderr.contains("payload \"evil.tar\"") && stderr.contains("'..'"),
        "{stderr}"
    );
    assert!(log.contains("wiped the partition table"), "{log}");
    assert!(!dir.parent().unwrap().join("escaped-dot").exists());
}

#[test]
fn an_absolute_symlink_escape_is_refused() {
    if !can_run("an_absolute_symlink_escape_is_refused") {
        return;
    }
    let tmp = setup("symlink");
    let dir = tmp.path();
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    tar_with(&dir.join("payloads/evil.tar"), |b| {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        b.append_link(&mut h, "etc", &outside).unwrap();
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 4);
        b.append_data(&mut h, "etc/pwned", &b"bad\n"[..]).unwrap();
    });
    let job = format!("id = \"symlink\"\n[[payloads]]\nname = \"evil.tar\"\n{LAYOUT}");
    let (stderr, _) = fails(dir, &job, 1);
    assert!(stderr.contains("resolves outside"), "{stderr}");
    assert!(
        !outside.join("pwned").exists(),
        "the payload wrote outside the target"
    );
}

#[test]
fn a_symlink_planted_by_an_earlier_payload_is_refused() {
    if !can_run("a_symlink_planted_by_an_earlier_payload_is_refused") {
        return;
    }
    let tmp = setup("planted");
    let dir = tmp.path();
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    tar_with(&dir.join("payloads/one.tar"), |b| {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        b.append_link(&mut h, "up", "../../../../../../..").unwrap();
    });
    let rel = outside.strip_prefix("/").unwrap().join("pwned");
    tar_with(&dir.join("payloads/two.tar"), |b| {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 4);
        b.append_data(&mut h, Path::new("up").join(&rel), &b"bad\n"[..])
            .unwrap();
    });
    let job = format!(
        "id = \"planted\"\n[[payloads]]\nname = \"one.tar\"\n[[payloads]]\nname = \"two.tar\"\n{LAYOUT}"
    );
    let (stderr, _) = fails(dir, &job, 1);
    assert!(
        stderr.contains("payload \"two.tar\"") && stderr.contains("resolves outside"),
        "{stderr}"
    );
    assert!(
        !outside.join("pwned").exists(),
        "the payload wrote outside the target"
    );
}

#[test]
fn a_wrong_payload_hash_is_refused_before_the_disk_is_touched() {
    if !can_run("a_wrong_payload_hash_is_refused_before_the_disk_is_touched") {
        return;
    }
    let tmp = setup("hash");
    let dir = tmp.path();
    tar_with(&dir.join("payloads/os.tar"), |_| {});
    let job = format!(
        "id = \"hash\"\n[[payloads]]\nname = \"os.tar\"\nblake3 = \"{}\"\n{LAYOUT}",
        "0".repeat(64)
    );
    let (stderr, _) = fails(dir, &job, 2);
    assert!(
        stderr.contains("payloads[0] \"os.tar\": BLAKE3 ")
            && stderr.contains("does not match the pinned"),
        "{stderr}"
    );
}

#[test]
fn a_failing_step_fails_the_build() {
    if !can_run("a_failing_step_fails_the_build") {
        return;
    }
    let tmp = setup("step");
    let dir = tmp.path();
    let job = format!(
        "id = \"step\"\n[[steps]]\nname = \"breaks\"\nwhere = \"agent\"\nrun = \"echo about to fail; exit 3\"\n{LAYOUT}"
    );
    let (stderr, log) = fails(dir, &job, 1);
    assert!(
        stderr.contains("step \"breaks\" failed (exit status: 3)"),
        "{stderr}"
    );
    assert!(log.contains("breaks out| about to fail"), "{log}");
}

#[test]
fn a_step_over_its_time_limit_is_stopped() {
    if !can_run("a_step_over_its_time_limit_is_stopped") {
        return;
    }
    let tmp = setup("slow");
    let dir = tmp.path();
    let job = format!(
        "id = \"slow\"\n[[steps]]\nname = \"sleeps\"\nwhere = \"agent\"\ntime_limit = \"1s\"\nrun = \"sleep 60\"\n{LAYOUT}"
    );
    let started = std::time::Instant::now();
    let (stderr, _) = fails(dir, &job, 1);
    assert!(
        stderr.contains("step \"sleeps\" ran over its time limit of 1s"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(50),
        "the step was not stopped"
    );
}
