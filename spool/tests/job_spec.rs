//! Job spec v1 against golden fixtures: a full job, and one file per
//! rejection whose first lines say which field the error must name.

use std::path::{Path, PathBuf};

use kiln_spool::job::{Firmware, FsKind, Loader, Mode, PartKind, StepPlace, Table};
use kiln_spool::units::Size;
use kiln_spool::{load_job, parse_job};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn full_job_parses_every_field() {
    let job = load_job(&fixtures().join("full.toml")).unwrap();
    assert_eq!(job.id, "web-01");
    assert_eq!(job.priority, 700);
    assert_eq!(job.time_limit.as_secs(), 45 * 60);
    assert_eq!(job.max_attempts, 4);
    assert_eq!(job.disk.table, Table::Gpt);
    let parts = &job.disk.partitions;
    assert_eq!(parts.len(), 4);
    assert_eq!((parts[0].kind, parts[0].fs), (PartKind::Esp, FsKind::Vfat));
    assert_eq!(parts[0].size, Size::Bytes(64 << 20));
    assert_eq!(parts[0].mount.as_deref(), Some("/boot/efi"));
    assert_eq!(parts[1].mount, None);
    assert_eq!(parts[3].size, Size::Rest);
    assert_eq!(job.payloads[0].dest, "/");
    assert!(job.payloads[0].blake3.is_some());
    assert_eq!(job.payloads[1].blake3, None);
    assert_eq!(job.payloads[1].dest, "/srv/web");
    assert_eq!(job.configure.hostname.as_deref(), Some("web-01.example"));
    let ops = &job.configure.users[0];
    assert_eq!((ops.uid, ops.gid), (Some(1000), Some(1000)));
    assert_eq!(ops.groups, ["sudo", "adm"]);
    assert_eq!(ops.home_dir(), "/home/ops");
    assert_eq!(job.configure.files[0].mode, Mode(0o644));
    assert_eq!(job.configure.files[1].mode, Mode(0o600));
    assert_eq!(job.configure.files[0].content, "Built by kiln\n");
    assert_eq!(job.steps[0].place, StepPlace::Target);
    assert_eq!(job.steps[1].place, StepPlace::Agent);
    assert_eq!(job.steps[1].time_limit.as_secs(), 600);
    assert_eq!(job.image.compression_level, 6);
    assert!(!job.image.generalize);
    let boot = job.boot.as_ref().unwrap();
    assert_eq!(boot.firmware, Firmware::Uefi);
    assert_eq!(boot.loader, Loader::Grub);
    assert_eq!(boot.cmdline, "console=ttyS0,115200 console=tty0");
    assert_eq!(job.min_disk_bytes(), (64 + 128 + 2048 + 1 + 2) << 20);
}

#[test]
fn full_job_round_trips_through_toml() {
    let job = load_job(&fixtures().join("full.toml")).unwrap();
    let text = toml::to_string(&job).unwrap();
    assert_eq!(parse_job(&text).unwrap(), job);
}

#[test]
fn every_rejection_names_its_field() {
    let dir = fixtures().join("reject");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let field = lines
            .next()
            .and_then(|l| l.strip_prefix("# expect-field:"))
            .map(str::trim);
        let problem = lines
            .next()
            .and_then(|l| l.strip_prefix("# expect-problem:"))
            .map(str::trim);
        let (Some(field), Some(problem)) = (field, problem) else {
            panic!("{}: no expect-field/expect-problem header", path.display());
        };
        let err = match load_job(&path) {
            Ok(_) => panic!(
                "{}: accepted, expected an error at {field:?}",
                path.display()
            ),
            Err(e) => e,
        };
        assert_eq!(err.field, field, "{}: wrong field in {err}", path.display());
        assert!(
            err.problem.contains(problem),
            "{}: {err:?} does not say {problem:?}",
            path.display()
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with(&path.display().to_string()),
            "{shown} does not name the file"
        );
        if !field.is_empty() {
            assert!(shown.contains(field), "{shown} does not name the field");
        }
        seen += 1;
    }
    assert!(seen >= 95, "only {seen} rejection fixtures found");
}

#[test]
fn a_missing_file_is_named() {
    let err = load_job(Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/job.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn example_jobs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load_job(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n > 0, "no example jobs in {}", dir.display());
}
