//! The master's one reader of what agents write: leases, heartbeats and
//! uploads. Whoever can fetch the initramfs holds the agent key, so all of
//! it is hostile input. Every record is read relative to the spool without
//! following a symlink (the master's [`crate::LocalSpool`] resolves every
//! path beneath its root), only from a regular file, up to a size cap; every
//! field is validated, paths are built from validated names only, and each
//! number an agent wrote is used with checked arithmetic. A record that
//! fails is an [`Untrusted::Bad`] that names the file and the problem, for
//! the caller to report once and set aside; it never stops a pass.

use std::io;

use crate::lease::{check_token, Lease};
use crate::manifest::{
    Hardware, ImageManifest, PhaseTime, Provenance, MAX_GENERALIZED, MAX_GENERALIZED_LINE,
    MAX_HARDWARE_FIELD, MAX_NICS,
};
use crate::names::check_job_id;
use crate::spool::{lease_path, status_path, SpoolFs};
use crate::status::Status;
use crate::upload::{ChunkList, DeployReport, CHUNKS, DEPLOYED, MANIFEST};

/// Largest lease file.
pub const MAX_LEASE: u64 = 4 << 10;
/// Largest status file.
pub const MAX_STATUS: u64 = 16 << 10;
/// Largest chunk list or manifest: a few hundred thousand ranges.
pub const MAX_UPLOAD_RECORD: u64 = 32 << 20;
/// Largest job log the master keeps with an image; the rest is cut off.
pub const MAX_JOB_LOG: u64 = 16 << 20;
/// Longest agent id, server address and message an agent may report.
pub const MAX_AGENT_ID: usize = 128;
pub const MAX_SERVER: usize = 256;
pub const MAX_MESSAGE: usize = 4096;
/// Most bytes a phase may report in all: 1 PiB, far above any disk or payload.
pub const MAX_PHASE_BYTES: u64 = 1 << 50;
/// Largest `deployed.toml`.
pub const MAX_DEPLOY_REPORT: u64 = 64 << 10;
/// Most phases a manifest or deploy report may list, and the longest name.
pub const MAX_PHASES: usize = 64;
pub const MAX_PHASE_NAME: usize = 64;
/// Longest phase a record may report: ten years, in seconds.
pub const MAX_PHASE_SECONDS: f64 = 10.0 * 366.0 * 86400.0;
/// Longest kiln version string an agent may report.
pub const MAX_VERSION: usize = 64;
/// Most CPUs an agent may report.
pub const MAX_CPUS: u32 = 1 << 20;
/// Longest disk name in a deploy report.
pub const MAX_DISK_NAME: usize = 256;

/// Why something an agent wrote was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// The record is malformed, oversized, not a regular file, or reached
    /// through a symlink: report it and set it aside.
    #[error("{path}: {problem}")]
    Bad { path: String, problem: String },
    /// The spool itself failed (a disk error): not the agent's doing.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// I/O errors that mean the entry is not what it should be (a symlink on
/// the way, a directory or FIFO where a file belongs, too large) rather
/// than the spool failing.
fn is_hostile(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
    ) || matches!(
        e.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EISDIR as i32
            || code == nix::errno::Errno::ENOTDIR as i32
            || code == nix::errno::Errno::ELOOP as i32
    )
}

fn bad(path: &str, problem: impl Into<String>) -> Untrusted {
    Untrusted::Bad {
        path: path.to_string(),
        problem: problem.into(),
    }
}

/// Reads an agent-written file as UTF-8 text of at most `max` bytes;
/// `None` if it does not exist.
pub fn read_text(fs: &dyn SpoolFs, path: &str, max: u64) -> Result<Option<String>, Untrusted> {
    let bytes = match fs.read_capped(path, max) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) if is_hostile(&e) => return Err(bad(path, e.to_string())),
        Err(source) => {
            return Err(Untrusted::Io {
                what: format!("reading {path}"),
                source,
            })
        }
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad(path, "is not UTF-8"))
}

/// A string an agent wrote that the operator will see: bounded, one line.
pub fn check_text(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            s.len()
        ));
    }
    if s.contains(['\0', '\n']) {
        return Err(format!("{field} holds a NUL or a newline"));
    }
    Ok(())
}

/// The manifest's record of what generalizing removed: bounded, one line
/// of printable text each.
pub fn check_generalized(lines: &[String]) -> Result<(), String> {
    if lines.len() > MAX_GENERALIZED {
        return Err(format!(
            "generalized has {} lines; at most {MAX_GENERALIZED} are allowed",
            lines.len()
        ));
    }
    for (i, l) in lines.iter().enumerate() {
        check_text(&format!("generalized[{i}]"), l, MAX_GENERALIZED_LINE)?;
        if l.chars().any(char::is_control) {
            return Err(format!("generalized[{i}] holds a control character"));
        }
    }
    Ok(())
}

/// One line of printable text: bounded, no control characters.
fn check_line(field: &str, s: &str, max: usize) -> Result<(), String> {
    check_text(field, s, max)?;
    if s.chars().any(crate::printable::needs_escape) {
        return Err(format!("{field} holds a control character"));
    }
    Ok(())
}

/// A MAC address as the kernel prints it: six (or, for InfiniBand,
/// twenty) two-digit hex octets joined by colons.
pub fn check_mac(field: &str, mac: &str) -> Result<(), String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = matches!(octets.len(), 6 | 20)
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(format!(
            "{field} {:?} is not a MAC address (xx:xx:xx:xx:xx:xx)",
            mac.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// The build machine's description as an agent reports it.
pub fn check_hardware(h: &Hardware) -> Result<(), String> {
    for (field, value) in [
        ("hardware.vendor", &h.vendor),
        ("hardware.product", &h.product),
        ("hardware.cpu_model", &h.cpu_model),
        ("hardware.disk_model", &h.disk_model),
    ] {
        check_line(field, value, MAX_HARDWARE_FIELD)?;
    }
    if h.cpus > MAX_CPUS {
        return Err(format!(
            "hardware.cpus is {}; at most {MAX_CPUS} are allowed",
            h.cpus
        ));
    }
    for (field, value) in [
        ("hardware.memory_bytes", h.memory_bytes),
        ("hardware.disk_size", h.disk_size),
    ] {
        if value > MAX_PHASE_BYTES {
            return Err(format!("{field} {value} is more than {MAX_PHASE_BYTES}"));
        }
    }
    if h.nics.len() > MAX_NICS {
        return Err(format!(
            "hardware.nics has {} entries; at most {MAX_NICS} are allowed",
            h.nics.len()
        ));
    }
    for (i, n) in h.nics.iter().enumerate() {
        check_line(
            &format!("hardware.nics[{i}].name"),
            &n.name,
            MAX_HARDWARE_FIELD,
        )?;
        check_mac(&format!("hardware.nics[{i}].mac"), &n.mac)?;
    }
    Ok(())
}

/// Phase times: a bounded list of named, finite, non-negative durations.
pub fn check_phases(phases: &[PhaseTime]) -> Result<(), String> {
    if phases.len() > MAX_PHASES {
        return Err(format!(
            "phases has {} entries; at most {MAX_PHASES} are allowed",
            phases.len()
        ));
    }
    for (i, p) in phases.iter().enumerate() {
        check_line(&format!("phases[{i}].name"), &p.name, MAX_PHASE_NAME)?;
        if !(0.0..=MAX_PHASE_SECONDS).contains(&p.seconds) {
            return Err(format!(
                "phases[{i}].seconds {} is not between 0 and {MAX_PHASE_SECONDS}",
                p.seconds
            ));
        }
    }
    Ok(())
}

/// What an agent may say of itself in a manifest's provenance. The fields
/// the master sets when it publishes are not checked here: the master
/// replaces them whatever they hold.
pub fn check_provenance(p: &Provenance) -> Result<(), String> {
    check_line("provenance.kiln_version", &p.kiln_version, MAX_VERSION)?;
    check_hardware(&p.hardware).map_err(|e| format!("provenance.{e}"))
}

/// A BLAKE3 digest as kiln writes them: 64 lower-case hex digits.
pub fn check_blake3(field: &str, s: &str) -> Result<(), String> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "{field} {:?} is not a BLAKE3 digest (64 lower-case hex digits)",
            s.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Reads and checks `<dir>/deployed.toml`, the report of an agent that
/// deployed `image` for job `job`; `None` if it is not there (yet).
pub fn deploy_report(
    fs: &dyn SpoolFs,
    dir: &str,
    job: &str,
    image: &str,
) -> Result<Option<DeployReport>, Untrusted> {
    let path = format!("{dir}/{DEPLOYED}");
    let Some(text) = read_text(fs, &path, MAX_DEPLOY_REPORT)? else {
        return Ok(None);
    };
    let r = DeployReport::parse(&text).map_err(|e| bad(&path, e.to_string()))?;
    check_deploy_report(&r, job, image).map_err(|p| bad(&path, p))?;
    Ok(Some(r))
}

/// The checks on a deploy report for job `job`, whose job file names `image`.
pub fn check_deploy_report(r: &DeployReport, job: &str, image: &str) -> Result<(), String> {
    if r.job != job {
        return Err(format!(
            "job {:?} is not {job:?}",
            r.job.escape_debug().to_string()
        ));
    }
    if r.image != image {
        return Err(format!(
            "image {:?} is not {image:?}, the image the job deploys",
            r.image.escape_debug().to_string()
        ));
    }
    check_blake3("manifest_blake3", &r.manifest_blake3)?;
    check_blake3("image_blake3", &r.image_blake3)?;
    check_line("agent", &r.agent, MAX_AGENT_ID)?;
    if r.agent.is_empty() {
        return Err("agent is empty".into());
    }
    check_line("disk", &r.disk, MAX_DISK_NAME)?;
    for (field, value) in [
        ("disk_size", r.disk_size),
        ("bytes_written", r.bytes_written),
    ] {
        if value > MAX_PHASE_BYTES {
            return Err(format!("{field} {value} is more than {MAX_PHASE_BYTES}"));
        }
    }
    check_phases(&r.phases)?;
    check_hardware(&r.hardware)
}

/// The checks on a lease that the file name `id` holds.
pub fn check_lease(lease: &Lease, id: &str) -> Result<(), String> {
    if lease.job != id {
        return Err(format!(
            "job {:?} differs from the file name {id:?}",
            lease.job.escape_debug().to_string()
        ));
    }
    check_token(&lease.token).map_err(|e| format!("token: {e}"))?;
    check_text("agent", &lease.agent, MAX_AGENT_ID)?;
    if lease.agent.is_empty() {
        return Err("agent is empty".into());
    }
    Ok(())
}

/// Reads and validates `leases/<id>`. `id` must already be a valid job id.
/// The deadline and attempt the file holds are the agent's word and are not
/// used by the master (see [`crate::queue::Entry::deadline`]).
pub fn lease(fs: &dyn SpoolFs, id: &str) -> Result<Option<Lease>, Untrusted> {
    let path = lease_path(id);
    check_job_id(id).map_err(|p| bad(&path, format!("job id {p}")))?;
    let Some(text) = read_text(fs, &path, MAX_LEASE)? else {
        return Ok(None);
    };
    let lease = Lease::parse(&text).map_err(|e| bad(&path, e.to_string()))?;
    check_lease(&lease, id).map_err(|p| bad(&path, p))?;
    Ok(Some(lease))
}

/// The checks on a heartbeat for job `id`.
pub fn check_status(s: &Status, id: &str) -> Result<(), String> {
    if s.job != id {
        return Err(format!(
            "job {:?} differs from the file name {id:?}",
            s.job.escape_debug().to_string()
        ));
    }
    check_token(&s.token).map_err(|e| format!("token: {e}"))?;
    check_text("agent", &s.agent, MAX_AGENT_ID)?;
    check_text("server", &s.server, MAX_SERVER)?;
    // A message may span lines (a step's stderr tail); it is escaped for display.
    if s.message.len() > MAX_MESSAGE {
        return Err(format!(
            "message is {} bytes long; at most {MAX_MESSAGE} are allowed",
            s.message.len()
        ));
    }
    if !(0.0..=1.0).contains(&s.progress) {
        return Err(format!("progress {} is not between 0 and 1", s.progress));
    }
    if s.bytes_total > MAX_PHASE_BYTES {
        return Err(format!(
            "bytes_total {} is more than {MAX_PHASE_BYTES}",
            s.bytes_total
        ));
    }
    if s.bytes_done > s.bytes_total {
        return Err(format!(
            "bytes_done {} is more than bytes_total {}",
            s.bytes_done, s.bytes_total
        ));
    }
    Ok(())
}

/// Reads and validates `status/<id>.toml`.
pub fn status(fs: &dyn SpoolFs, id: &str) -> Result<Option<Status>, Untrusted> {
    let path = status_path(id);
    check_job_id(id).map_err(|p| bad(&path, format!("job id {p}")))?;
    let Some(text) = read_text(fs, &path, MAX_STATUS)? else {
        return Ok(None);
    };
    let status = Status::parse(&text).map_err(|e| bad(&path, e.to_string()))?;
    check_status(&status, id).map_err(|p| bad(&path, p))?;
    Ok(Some(status))
}

/// The heartbeat of the holder of `lease`, if it wrote one; anything
/// unreadable or from another lease counts as none.
pub fn status_of(fs: &dyn SpoolFs, lease: &Lease) -> Option<Status> {
    status(fs, &lease.job)
        .ok()
        .flatten()
        .filter(|s| s.token == lease.token)
}

/// An upload's chunk list and manifest, read from `dir`, checked against
/// each other and against `job`; the text of the manifest is kept as the
/// agent wrote it, since that is what gets published.
pub struct UploadRecords {
    pub chunks: ChunkList,
    pub manifest: ImageManifest,
    pub manifest_text: String,
}

pub fn upload_records(fs: &dyn SpoolFs, dir: &str, job: &str) -> Result<UploadRecords, Untrusted> {
    let chunks_path = format!("{dir}/{CHUNKS}");
    let chunks_text = read_text(fs, &chunks_path, MAX_UPLOAD_RECORD)?
        .ok_or_else(|| bad(&chunks_path, "is missing"))?;
    let chunks = ChunkList::parse(&chunks_text).map_err(|e| bad(&chunks_path, e.to_string()))?;
    chunks.check_shape().map_err(|p| bad(&chunks_path, p))?;
    let manifest_path = format!("{dir}/{MANIFEST}");
    let manifest_text = read_text(fs, &manifest_path, MAX_UPLOAD_RECORD)?
        .ok_or_else(|| bad(&manifest_path, "is missing"))?;
    let manifest =
        ImageManifest::parse(&manifest_text).map_err(|e| bad(&manifest_path, e.to_string()))?;
    if manifest.job != job {
        return Err(bad(
            &manifest_path,
            format!("is for job {:?}", manifest.job.escape_debug().to_string()),
        ));
    }
    if manifest.image_size != chunks.total_size {
        return Err(bad(
            &manifest_path,
            format!(
                "says the image is {} bytes, the chunks hold {}",
                manifest.image_size, chunks.total_size
            ),
        ));
    }
    check_text("agent", &manifest.agent, MAX_AGENT_ID).map_err(|p| bad(&manifest_path, p))?;
    check_generalized(&manifest.generalized).map_err(|p| bad(&manifest_path, p))?;
    check_phases(&manifest.phases).map_err(|p| bad(&manifest_path, p))?;
    if let Some(p) = &manifest.provenance {
        check_provenance(p).map_err(|e| bad(&manifest_path, e))?;
    }
    if manifest.payloads.len() > crate::job::MAX_PAYLOADS {
        return Err(bad(
            &manifest_path,
            format!(
                "payloads has {} entries; at most {} are allowed",
                manifest.payloads.len(),
                crate::job::MAX_PAYLOADS
            ),
        ));
    }
    for (i, p) in manifest.payloads.iter().enumerate() {
        check_line(&format!("payloads[{i}].name"), &p.name, MAX_HARDWARE_FIELD)
            .and_then(|()| check_line(&format!("payloads[{i}].blake3"), &p.blake3, 64))
            .map_err(|e| bad(&manifest_path, e))?;
    }
    manifest
        .ranges
        .iter()
        .try_fold(0u64, |sum, r| {
            r.offset
                .checked_add(r.length)
                .filter(|end| *end <= manifest.disk_size)
                .and(sum.checked_add(r.length))
        })
        .ok_or_else(|| bad(&manifest_path, "a data range lies outside the disk"))?;
    Ok(UploadRecords {
        chunks,
        manifest,
        manifest_text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::LocalSpool;
    use crate::time::Timestamp;
    use std::os::unix::fs::symlink;

    fn spool() -> (tempfile::TempDir, LocalSpool) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["leases", "status"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let s = LocalSpool::new(dir.path());
        (dir, s)
    }

    fn lease_text(job: &str, token: &str, agent: &str) -> String {
        format!(
            "job = {job:?}\nagent = {agent:?}\ntoken = {token:?}\nacquired = \"2026-01-01T00:00:00Z\"\n\
             deadline = \"9999-12-31T23:59:59Z\"\nattempt = 0\n"
        )
    }

    #[test]
    fn what_generalizing_removed_is_bounded_printable_lines() {
        let line = |s: &str| vec![s.to_string()];
        check_generalized(&line("/etc/ssh/ssh_host_ed25519_key")).unwrap();
        check_generalized(&line(&"x".repeat(MAX_GENERALIZED_LINE))).unwrap();
        for (lines, want) in [
            (line(&"x".repeat(MAX_GENERALIZED_LINE + 1)), "at most 512"),
            (line("a\nb"), "newline"),
            (line("\u{1b}[2J"), "control character"),
            (vec![String::new(); MAX_GENERALIZED + 1], "at most 256"),
        ] {
            let e = check_generalized(&lines).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn macs_are_six_or_twenty_hex_octets() {
        check_mac("m", "52:54:00:12:34:56").unwrap();
        check_mac("m", "D8:9E:F3:1A:2B:3C").unwrap();
        check_mac("m", &vec!["80"; 20].join(":")).unwrap();
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525400123456",
            "52-54-00-12-34-56",
        ] {
            let e = check_mac("hardware.nics[0].mac", bad).unwrap_err();
            assert!(e.starts_with("hardware.nics[0].mac"), "{e}");
        }
    }

    #[test]
    fn a_deploy_report_names_its_job_and_image_and_is_bounded() {
        let good = crate::upload::DeployReport {
            job: "d1".into(),
            image: "img".into(),
            manifest_blake3: "ab".repeat(32),
            image_blake3: "cd".repeat(32),
            agent: "n7".into(),
            disk: "/dev/vda".into(),
            disk_size: 16 << 30,
            grown: true,
            bytes_written: 1 << 30,
            started: Timestamp(1),
            finished: Timestamp(2),
            phases: vec![],
            hardware: Hardware::default(),
        };
        check_deploy_report(&good, "d1", "img").unwrap();
        type Change = fn(&mut crate::upload::DeployReport);
        let cases: [(Change, &str); 7] = [
            (|r| r.job = "d2".into(), "job \"d2\""),
            (|r| r.image = "other".into(), "image \"other\""),
            (|r| r.manifest_blake3 = "AB".repeat(32), "manifest_blake3"),
            (
                |r| r.agent = "n7\u{1b}[2J".into(),
                "agent holds a control character",
            ),
            (|r| r.disk = "d".repeat(MAX_DISK_NAME + 1), "disk is"),
            (|r| r.bytes_written = MAX_PHASE_BYTES + 1, "bytes_written"),
            (
                |r| {
                    r.hardware.nics = vec![crate::manifest::Nic {
                        name: "e".into(),
                        mac: "x".into(),
                    }]
                },
                "hardware.nics[0].mac",
            ),
        ];
        for (change, want) in cases {
            let mut r = good.clone();
            change(&mut r);
            let e = check_deploy_report(&r, "d1", "img").unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let mut r = good.clone();
        r.phases = vec![PhaseTime {
            name: "deploy".into(),
            seconds: f64::NAN,
            started: None,
        }];
        let e = check_deploy_report(&r, "d1", "img").unwrap_err();
        assert!(e.contains("phases[0].seconds"), "{e}");
    }

    #[test]
    fn a_lease_must_name_its_own_file() {
        let (dir, s) = spool();
        let put = |name: &str, text: &str| {
            std::fs::write(dir.path().join("leases").join(name), text).unwrap()
        };
        put("a", &lease_text("a", "1-00ff", "n1"));
        assert_eq!(lease(&s, "a").unwrap().unwrap().agent, "n1");
        for (text, want) in [
            (
                lease_text("X/../../..", "1-00ff", "n1"),
                "differs from the file name",
            ),
            (
                lease_text("../jobs.toml", "1-00ff", "n1"),
                "differs from the file name",
            ),
            (lease_text("a", "../../x", "n1"), "token"),
            (lease_text("a", "1-00ff", ""), "agent is empty"),
            (lease_text("a", "1-00ff", &"n".repeat(200)), "at most 128"),
            ("garbage".to_string(), "leases/a"),
        ] {
            put("a", &text);
            let e = lease(&s, "a").unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("leases/a"), "{text}: {e}");
        }
        put("a", &"x".repeat(MAX_LEASE as usize + 1));
        let e = lease(&s, "a").unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        assert!(lease(&s, "../jobs").is_err());
        assert!(lease(&s, "b").unwrap().is_none());
    }

    #[test]
    fn records_through_symlinks_or_of_the_wrong_kind_are_bad() {
        let (dir, s) = spool();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("l"), lease_text("a", "1-00ff", "n1")).unwrap();
        symlink(outside.path().join("l"), dir.path().join("leases/a")).unwrap();
        assert!(matches!(lease(&s, "a"), Err(Untrusted::Bad { .. })));
        symlink("/dev/zero", dir.path().join("status/a.toml")).unwrap();
        assert!(matches!(status(&s, "a"), Err(Untrusted::Bad { .. })));
        std::fs::create_dir(dir.path().join("leases/b")).unwrap();
        assert!(matches!(lease(&s, "b"), Err(Untrusted::Bad { .. })));
    }

    #[test]
    fn status_fields_are_bounded() {
        let (dir, s) = spool();
        let good = Status {
            job: "a".into(),
            agent: "n1".into(),
            token: "1-00ff".into(),
            server: "127.0.0.1:22".into(),
            state: crate::status::AgentState::Building,
            phase: crate::status::Phase::Payloads,
            progress: 0.5,
            bytes_done: 412 << 20,
            bytes_total: 731 << 20,
            message: "line one\nline two".into(),
            started: Timestamp(1),
            updated: Timestamp(2),
        };
        let put =
            |st: &Status| std::fs::write(dir.path().join("status/a.toml"), st.to_toml()).unwrap();
        put(&good);
        assert_eq!(status(&s, "a").unwrap().unwrap(), good);
        type Change = fn(&mut Status);
        let cases: [(Change, &str); 6] = [
            (|s| s.job = "b".into(), "differs"),
            (|s| s.message = "m".repeat(MAX_MESSAGE + 1), "message"),
            (|s| s.progress = 7.0, "progress"),
            (|s| s.bytes_done = s.bytes_total + 1, "bytes_done"),
            (
                |s| {
                    s.bytes_total = MAX_PHASE_BYTES + 1;
                    s.bytes_done = 1;
                },
                "bytes_total",
            ),
            (|s| s.agent = "a\nb".into(), "agent"),
        ];
        for (change, want) in cases {
            let mut st = good.clone();
            change(&mut st);
            put(&st);
            let e = status(&s, "a").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // A phase is one of the job's phases, never free text.
        let text = good.to_toml().replace("\"payloads\"", "\"p\\u001b[2J\"");
        std::fs::write(dir.path().join("status/a.toml"), text).unwrap();
        let e = status(&s, "a").unwrap_err().to_string();
        assert!(e.contains("phase"), "{e}");
        // Byte counts past what TOML's integers hold are refused by the parser.
        let text = good
            .to_toml()
            .replace(&format!("{}", 731u64 << 20), "18446744073709551616");
        std::fs::write(dir.path().join("status/a.toml"), text).unwrap();
        assert!(status(&s, "a").is_err());
    }
}
