//! Job spec v1: the TOML file an operator writes to describe one image.
//!
//! `parse_job` is pure and reports the first problem as `field: problem`;
//! `load_job` adds the file's name. Unknown fields are refused.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{check_job_id, check_payload_name, check_target_path};
use crate::units::{Size, Span};

/// A job spec that failed to load: which file, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobError {
    pub file: Option<PathBuf>,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

impl JobError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        JobError {
            file: None,
            field: field.into(),
            problem: problem.into(),
        }
    }
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }
}

pub const MIN_PRIORITY: u32 = 0;
pub const MAX_PRIORITY: u32 = 1000;
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub id: String,
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(default = "default_time_limit")]
    pub time_limit: Span,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub description: String,
    pub disk: Disk,
    #[serde(default)]
    pub payloads: Vec<Payload>,
    #[serde(default)]
    pub configure: Configure,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub image: ImageSpec,
}

fn default_priority() -> u32 {
    500
}
fn default_time_limit() -> Span {
    Span::from_secs(3600)
}
fn default_max_attempts() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub table: Table,
    pub partitions: Vec<Partition>,
}

fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    #[default]
    Gpt,
    Mbr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub label: String,
    pub size: Size,
    pub kind: PartKind,
    pub fs: FsKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    Esp,
    Linux,
    Swap,
    BiosBoot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Vfat,
    Ext4,
    Swap,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default = "default_dest")]
    pub dest: String,
}

fn default_dest() -> String {
    "/".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default = "yes")]
    pub fstab: bool,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub files: Vec<File>,
}

impl Default for Configure {
    fn default() -> Self {
        Configure {
            hostname: None,
            timezone: None,
            fstab: true,
            users: vec![],
            files: vec![],
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "default_shell")]
    pub shell: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub authorized_keys: Vec<String>,
}

fn default_shell() -> String {
    "/bin/sh".into()
}

impl User {
    /// The home directory: `home` if given, else `/home/NAME` (`/root` for root).
    pub fn home_dir(&self) -> String {
        match &self.home {
            Some(h) => h.clone(),
            None if self.name == "root" => "/root".into(),
            None => format!("/home/{}", self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub path: String,
    #[serde(default)]
    pub content: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_owner")]
    pub owner: String,
}

fn default_owner() -> String {
    "root:root".into()
}
fn default_mode() -> Mode {
    Mode(0o644)
}

/// A file mode, written as an octal string (`"0644"`) or a TOML octal integer (`0o644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal mode like \"0644\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let m = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .map_err(|_| E::custom(format!("{v:?} is not an octal mode like \"0644\"")))?;
                self.visit_u64(m as u64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                self.visit_u64(
                    u64::try_from(v).map_err(|_| E::custom("a mode cannot be negative"))?,
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mode, E> {
                if v > 0o7777 {
                    return Err(E::custom(format!("{v:o} is larger than 7777")));
                }
                Ok(Mode(v as u32))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    pub run: String,
    #[serde(rename = "where", default)]
    pub place: StepPlace,
    #[serde(default = "default_step_time_limit")]
    pub time_limit: Span,
}

fn default_step_time_limit() -> Span {
    Span::from_secs(600)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepPlace {
    /// Chrooted into the built system.
    #[default]
    Target,
    /// In the agent, with `KILN_TARGET` naming the mounted target.
    Agent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_level")]
    pub compression_level: i32,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            format: default_format(),
            compression_level: default_level(),
        }
    }
}

fn default_format() -> String {
    "raw.zst".into()
}
fn default_level() -> i32 {
    3
}

/// Parses and validates a job spec. The error names the field and the problem.
pub fn parse_job(text: &str) -> Result<JobSpec, JobError> {
    let de = toml::Deserializer::new(text);
    let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let field = if field == "." { String::new() } else { field };
        let mut problem = inner.message().to_string();
        if let Some(span) = inner.span() {
            let (line, col) = line_col(text, span.start);
            problem = format!("{problem} (line {line}, column {col})");
        }
        JobError::new(field, problem)
    })?;
    validate(&spec)?;
    Ok(spec)
}

/// Reads, parses and validates a job file.
pub fn load_job(path: &Path) -> Result<JobSpec, JobError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobError::new("", format!("cannot read: {e}")).in_file(path))?;
    parse_job(&text).map_err(|e| e.in_file(path))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn check(ok: bool, field: impl Into<String>, problem: impl Into<String>) -> Result<(), JobError> {
    if ok {
        Ok(())
    } else {
        Err(JobError::new(field, problem))
    }
}

fn at<T>(field: impl Into<String>, r: Result<T, String>) -> Result<T, JobError> {
    r.map_err(|p| JobError::new(field, p))
}

fn validate(spec: &JobSpec) -> Result<(), JobError> {
    at("id", check_job_id(&spec.id))?;
    check(
        (MIN_PRIORITY..=MAX_PRIORITY).contains(&spec.priority),
        "priority",
        format!(
            "{} is out of range {MIN_PRIORITY}..={MAX_PRIORITY}",
            spec.priority
        ),
    )?;
    check(
        (1..=MAX_ATTEMPTS_LIMIT).contains(&spec.max_attempts),
        "max_attempts",
        format!(
            "{} is out of range 1..={MAX_ATTEMPTS_LIMIT}",
            spec.max_attempts
        ),
    )?;
    validate_disk(&spec.disk)?;
    let has_root = spec
        .disk
        .partitions
        .iter()
        .any(|p| p.mount.as_deref() == Some("/"));

    for (i, p) in spec.payloads.iter().enumerate() {
        let f = format!("payloads[{i}]");
        at(format!("{f}.name"), check_payload_name(&p.name))?;
        if let Some(h) = &p.blake3 {
            check(
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                format!("{f}.blake3"),
                format!("{h:?} is not a BLAKE3 hash (64 lower-case hex digits)"),
            )?;
        }
        at(format!("{f}.dest"), check_target_path(&p.dest))?;
    }
    let needs_root = !spec.payloads.is_empty()
        || spec.configure.hostname.is_some()
        || spec.configure.timezone.is_some()
        || !spec.configure.users.is_empty()
        || !spec.configure.files.is_empty()
        || spec.steps.iter().any(|s| s.place == StepPlace::Target);
    check(
        has_root || !needs_root,
        "disk.partitions",
        "no partition mounts \"/\", but payloads, configure or target steps need a root filesystem",
    )?;

    validate_configure(&spec.configure)?;

    let mut step_names = BTreeSet::new();
    for (i, s) in spec.steps.iter().enumerate() {
        let f = format!("steps[{i}]");
        check(!s.name.trim().is_empty(), format!("{f}.name"), "is empty")?;
        check(
            step_names.insert(&s.name),
            format!("{f}.name"),
            format!("{:?} is used by an earlier step", s.name),
        )?;
        check(!s.run.trim().is_empty(), format!("{f}.run"), "is empty")?;
        check(
            !s.run.contains('\0'),
            format!("{f}.run"),
            "holds a NUL byte",
        )?;
    }

    check(
        spec.image.format == "raw.zst",
        "image.format",
        format!(
            "{:?} is not supported; the only format is \"raw.zst\"",
            spec.image.format
        ),
    )?;
    check(
        (1..=22).contains(&spec.image.compression_level),
        "image.compression_level",
        format!("{} is out of range 1..=22", spec.image.compression_level),
    )?;
    Ok(())
}

fn validate_disk(disk: &Disk) -> Result<(), JobError> {
    check(
        disk.device == "auto"
            || (disk.device.starts_with("/dev/") && check_target_path(&disk.device).is_ok()),
        "disk.device",
        format!(
            "{:?} must be \"auto\" or a device path under /dev/",
            disk.device
        ),
    )?;
    check(
        !disk.partitions.is_empty(),
        "disk.partitions",
        "the layout has no partitions",
    )?;
    if disk.table == Table::Mbr {
        check(
            disk.partitions.len() <= 4,
            "disk.partitions",
            format!(
                "an MBR table holds at most 4 primary partitions, not {}",
                disk.partitions.len()
            ),
        )?;
    }
    let mut labels = BTreeSet::new();
    let mut mounts = BTreeSet::new();
    let last = disk.partitions.len() - 1;
    for (i, p) in disk.partitions.iter().enumerate() {
        let f = format!("disk.partitions[{i}]");
        let label_max = if p.fs == FsKind::Vfat { 11 } else { 16 };
        check(
            !p.label.is_empty()
                && p.label.len() <= label_max
                && p.label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            format!("{f}.label"),
            format!(
                "{:?} must be 1 to {label_max} characters of A-Z, a-z, 0-9, '-' or '_'",
                p.label
            ),
        )?;
        check(
            labels.insert(&p.label),
            format!("{f}.label"),
            format!("{:?} is used by an earlier partition", p.label),
        )?;
        match p.size {
            Size::Rest => check(
                i == last,
                format!("{f}.size"),
                "only the last partition can be \"rest\"",
            )?,
            Size::Bytes(n) => check(
                n >= 1 << 20 && n.is_multiple_of(1 << 20),
                format!("{f}.size"),
                format!("{} must be a whole number of MiB, at least 1MiB", p.size),
            )?,
        }
        let fits = matches!(
            (p.kind, p.fs),
            (PartKind::Esp, FsKind::Vfat)
                | (PartKind::Swap, FsKind::Swap)
                | (PartKind::BiosBoot, FsKind::None)
                | (PartKind::Linux, FsKind::Ext4 | FsKind::Vfat | FsKind::None)
        );
        check(
            fits,
            format!("{f}.fs"),
            format!("{:?} does not suit a partition of kind {:?}", p.fs, p.kind),
        )?;
        if p.kind == PartKind::BiosBoot {
            check(
                disk.table == Table::Gpt,
                format!("{f}.kind"),
                "a bios-boot partition needs a gpt table",
            )?;
        }
        if let Some(m) = &p.mount {
            at(format!("{f}.mount"), check_target_path(m))?;
            check(
                matches!(p.fs, FsKind::Ext4 | FsKind::Vfat),
                format!("{f}.mount"),
                format!("a {:?} partition cannot be mounted", p.fs),
            )?;
            check(
                mounts.insert(m.trim_end_matches('/')),
                format!("{f}.mount"),
                format!("{m:?} is mounted by an earlier partition"),
            )?;
        }
    }
    Ok(())
}

fn validate_configure(c: &Configure) -> Result<(), JobError> {
    if let Some(h) = &c.hostname {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        check(
            ok,
            "configure.hostname",
            format!("{h:?} is not a valid host name"),
        )?;
    }
    if let Some(tz) = &c.timezone {
        let ok = check_payload_name(tz).is_ok()
            && tz
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
        check(
            ok,
            "configure.timezone",
            format!("{tz:?} is not a zone name like \"Europe/Paris\" or \"UTC\""),
        )?;
    }
    let mut names = BTreeSet::new();
    for (i, u) in c.users.iter().enumerate() {
        let f = format!("configure.users[{i}]");
        check(
            valid_account_name(&u.name),
            format!("{f}.name"),
            format!(
                "{:?} is not a user name ([a-z_][a-z0-9_-]*, at most 32)",
                u.name
            ),
        )?;
        check(
            names.insert(&u.name),
            format!("{f}.name"),
            format!("{:?} is defined twice", u.name),
        )?;
        for (j, g) in u.groups.iter().enumerate() {
            check(
                valid_account_name(g),
                format!("{f}.groups[{j}]"),
                format!("{g:?} is not a group name"),
            )?;
        }
        at(format!("{f}.shell"), check_target_path(&u.shell))?;
        if let Some(h) = &u.home {
            at(format!("{f}.home"), check_target_path(h))?;
        }
        if let Some(p) = &u.password_hash {
            check(
                !p.contains([':', '\n', '\0']),
                format!("{f}.password_hash"),
                "holds ':', a newline or NUL, which would corrupt /etc/shadow",
            )?;
        }
        for (j, k) in u.authorized_keys.iter().enumerate() {
            check(
                !k.trim().is_empty() && !k.contains(['\n', '\r', '\0']),
                format!("{f}.authorized_keys[{j}]"),
                "must be one non-empty line",
            )?;
        }
    }
    let mut paths = BTreeSet::new();
    for (i, file) in c.files.iter().enumerate() {
        let f = format!("configure.files[{i}]");
        at(format!("{f}.path"), check_target_path(&file.path))?;
        check(
            file.path != "/" && !file.path.ends_with('/'),
            format!("{f}.path"),
            "must name a file, not a directory",
        )?;
        check(
            paths.insert(&file.path),
            format!("{f}.path"),
            format!("{:?} is written by an earlier file", file.path),
        )?;
        let mut parts = file.owner.splitn(2, ':');
        let user = parts.next().unwrap_or("");
        let group = parts.next().unwrap_or(user);
        check(
            [user, group].iter().all(|n| {
                valid_account_name(n) || (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            }),
            format!("{f}.owner"),
            format!(
                "{:?} must be \"user\" or \"user:group\" (names or numbers)",
                file.owner
            ),
        )?;
    }
    Ok(())
}

fn valid_account_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && n.len() <= 32
        && cs.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl JobSpec {
    /// The smallest disk that holds the layout: 1 MiB aligned, with room for
    /// the backup GPT, and 1 MiB for a `rest` partition.
    pub fn min_disk_bytes(&self) -> u64 {
        let parts: u64 = self
            .disk
            .partitions
            .iter()
            .map(|p| match p.size {
                Size::Bytes(n) => n,
                Size::Rest => 1 << 20,
            })
            .sum();
        parts + (2 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
id = "a"
[disk]
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
"#;

    #[test]
    fn minimal_job_gets_defaults() {
        let j = parse_job(MINIMAL).unwrap();
        assert_eq!(j.priority, 500);
        assert_eq!(j.max_attempts, 3);
        assert_eq!(j.time_limit.as_secs(), 3600);
        assert_eq!(j.disk.device, "auto");
        assert_eq!(j.image.format, "raw.zst");
        assert!(j.configure.fstab);
    }

    #[test]
    fn syntax_errors_give_a_position() {
        let e = parse_job("id = \n").unwrap_err();
        assert!(e.problem.contains("line 1"), "{e}");
    }
}
