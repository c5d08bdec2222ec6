//! Job spec v1: the TOML file an operator writes to describe one image.
//!
//! `parse_job` is pure and reports the first problem as `field: problem`;
//! `load_job` adds the file's name. Unknown fields are refused, and every
//! string and list has a bound (the `MAX_` constants below) so that a job
//! costs an agent little memory and its fields fit where they are written.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{check_job_id, check_payload_name, check_target_path};
use crate::units::{Size, TimeLimit};

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

/// Longest job file, in bytes. Inline files and scripts are for
/// configuration; anything bigger belongs in a payload.
pub const MAX_JOB_BYTES: usize = 1 << 20;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;
/// Most partitions: what a GPT's usual entry array holds.
pub const MAX_PARTITIONS: usize = 128;
pub const MAX_PAYLOADS: usize = 64;
pub const MAX_USERS: usize = 256;
/// Most supplementary groups per user.
pub const MAX_USER_GROUPS: usize = 64;
/// Longest home or shell, in bytes: both are fields of an /etc/passwd line.
pub const MAX_ACCOUNT_PATH: usize = 256;
/// Longest password hash, in bytes (a yescrypt or SHA-512 crypt hash is
/// about 100).
pub const MAX_PASSWORD_HASH: usize = 512;
/// Most authorized keys per user.
pub const MAX_AUTHORIZED_KEYS: usize = 64;
/// Longest authorized key line, in bytes: OpenSSH's own bound on a key.
pub const MAX_AUTHORIZED_KEY: usize = 16 << 10;
pub const MAX_FILES: usize = 1024;
/// Largest content of one configured file, in bytes.
pub const MAX_FILE_CONTENT: usize = 256 << 10;
pub const MAX_STEPS: usize = 256;
/// Longest step name, in bytes.
pub const MAX_STEP_NAME: usize = 64;
/// Longest step script, in bytes: it is passed as one argument to `sh -c`,
/// and the kernel refuses an argument of 128 KiB or more.
pub const MAX_STEP_RUN: usize = 64 << 10;
/// Longest extra kernel command line, in bytes: it goes into GRUB's config
/// beside the root and the distribution's own arguments, all within the
/// kernel's 2048-byte command line on x86.
pub const MAX_BOOT_CMDLINE: usize = 1024;

/// A job's time limit when its file gives none.
pub const DEFAULT_TIME_LIMIT: TimeLimit = match TimeLimit::from_secs(60 * 60) {
    Ok(t) => t,
    Err(_) => panic!("the default job time limit is out of range"),
};
/// A step's time limit when its file gives none.
pub const DEFAULT_STEP_TIME_LIMIT: TimeLimit = match TimeLimit::from_secs(10 * 60) {
    Ok(t) => t,
    Err(_) => panic!("the default step time limit is out of range"),
};

/// Directories no user may have as home. The agent makes a home its user's
/// (owner, mode 0750), which for these would hand the system over or lock
/// everyone else out. `/root` is root's own.
pub const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/include",
    "/usr/lib",
    "/usr/lib32",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/libx32",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/lib",
    "/usr/local/sbin",
    "/usr/local/share",
    "/usr/sbin",
    "/usr/share",
    "/usr/src",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/mail",
    "/var/spool",
    "/var/tmp",
];

/// Kernel file systems: nothing beneath them is a home.
const PSEUDO_FS_DIRS: [&str; 3] = ["/dev/", "/proc/", "/sys/"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub id: String,
    /// `build` (the default) makes an image; `deploy` writes a published
    /// one, named in `[deploy]`, onto the machine's disk.
    #[serde(default)]
    pub kind: JobKind,
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(default = "default_time_limit")]
    pub time_limit: TimeLimit,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub description: String,
    /// Required for a build; a deploy uses only `device`.
    #[serde(default)]
    pub disk: Disk,
    #[serde(default)]
    pub payloads: Vec<Payload>,
    #[serde(default)]
    pub configure: Configure,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub image: ImageSpec,
    /// What a `kind = "deploy"` job writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Build,
    Deploy,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Build => "build",
            JobKind::Deploy => "deploy",
        }
    }
}

/// `[deploy]`: which published image a deploy job writes, and what follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// The published image: its job id, as in `images/<id>/` on the job
    /// server.
    pub image: String,
    /// BLAKE3 of the image's manifest, if the job pins one: the deploy then
    /// refuses any other publication of that id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_blake3: Option<String>,
    /// Move the GPT's backup header to the end of a larger disk and grow the
    /// last partition and its ext4 filesystem to fill it.
    #[serde(default = "yes")]
    pub grow: bool,
    /// Reboot into the deployed system when done.
    #[serde(default = "yes")]
    pub reboot: bool,
}

fn default_priority() -> u32 {
    500
}
fn default_time_limit() -> TimeLimit {
    DEFAULT_TIME_LIMIT
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
    /// Required for a build (at least one); none for a deploy.
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_device() -> String {
    "auto".into()
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            device: default_device(),
            table: Table::default(),
            partitions: Vec::new(),
        }
    }
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
    pub time_limit: TimeLimit,
}

fn default_step_time_limit() -> TimeLimit {
    DEFAULT_STEP_TIME_LIMIT
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

/// How the image boots by itself: the agent installs the loader with the
/// target's own tools for the firmware named here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    pub firmware: Firmware,
    #[serde(default)]
    pub loader: Loader,
    /// Extra kernel arguments, e.g. a serial console.
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
    Bios,
    Both,
}

impl Firmware {
    pub fn uefi(self) -> bool {
        matches!(self, Firmware::Uefi | Firmware::Both)
    }
    pub fn bios(self) -> bool {
        matches!(self, Firmware::Bios | Firmware::Both)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loader {
    #[default]
    Grub,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Remove what ties the image to the machine that built it (SSH host
    /// keys, machine-id, random seed, leases, logs, package caches).
    #[serde(default = "yes")]
    pub generalize: bool,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            format: default_format(),
            compression_level: default_level(),
            generalize: true,
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
    check(text.len() <= MAX_JOB_BYTES, "", too_large(text.len()))?;
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

/// Reads, parses and validates a job file. Reads no more of it than a job
/// may hold.
pub fn load_job(path: &Path) -> Result<JobSpec, JobError> {
    let fail = |problem: String| JobError::new("", problem).in_file(path);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_JOB_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() > MAX_JOB_BYTES {
        return Err(fail(too_large(bytes.len())));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse_job(&text).map_err(|e| e.in_file(path))
}

fn too_large(len: usize) -> String {
    format!(
        "the job is {len} bytes or more; at most {MAX_JOB_BYTES} are allowed \
         (large files belong in a payload)"
    )
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

fn check_len(field: impl Into<String>, text: &str, max: usize) -> Result<(), JobError> {
    check(
        text.len() <= max,
        field,
        format!("is {} bytes long; at most {max} are allowed", text.len()),
    )
}

fn check_count<T>(
    field: impl Into<String>,
    items: &[T],
    max: usize,
    what: &str,
) -> Result<(), JobError> {
    check(
        items.len() <= max,
        field,
        format!("has {} {what}; at most {max} are allowed", items.len()),
    )
}

/// A field of an /etc/passwd, /etc/group or /etc/shadow line: `:` would
/// split it and a newline would start a line of its own.
fn check_account_field(field: impl Into<String>, text: &str, file: &str) -> Result<(), JobError> {
    check(
        !text.contains([':', '\n', '\r', '\0']),
        field,
        format!("holds ':', a newline or NUL, which would corrupt {file}"),
    )
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
    check_len("description", &spec.description, MAX_DESCRIPTION)?;
    check(
        !spec
            .description
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "description",
        "holds a control character other than a newline or a tab",
    )?;
    if spec.kind == JobKind::Deploy {
        return validate_deploy(spec);
    }
    check(
        spec.deploy.is_none(),
        "deploy",
        "is only for kind = \"deploy\" jobs",
    )?;
    check(
        spec.disk != Disk::default(),
        "",
        "missing field `disk`: a build job needs [disk] and its partitions",
    )?;
    validate_disk(&spec.disk)?;
    let has_root = spec
        .disk
        .partitions
        .iter()
        .any(|p| p.mount.as_deref() == Some("/"));

    check_count("payloads", &spec.payloads, MAX_PAYLOADS, "payloads")?;
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

    check_count("steps", &spec.steps, MAX_STEPS, "steps")?;
    let mut step_names = BTreeSet::new();
    for (i, s) in spec.steps.iter().enumerate() {
        let f = format!("steps[{i}]");
        check(!s.name.trim().is_empty(), format!("{f}.name"), "is empty")?;
        check_len(format!("{f}.name"), &s.name, MAX_STEP_NAME)?;
        check(
            !s.name.chars().any(char::is_control),
            format!("{f}.name"),
            "holds a control character",
        )?;
        check(
            step_names.insert(&s.name),
            format!("{f}.name"),
            format!("{:?} is used by an earlier step", s.name),
        )?;
        check(!s.run.trim().is_empty(), format!("{f}.run"), "is empty")?;
        check_len(format!("{f}.run"), &s.run, MAX_STEP_RUN)?;
        check(
            !s.run.contains('\0'),
            format!("{f}.run"),
            "holds a NUL byte",
        )?;
    }

    if let Some(boot) = &spec.boot {
        validate_boot(boot, &spec.disk, has_root)?;
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

/// A deploy job names a published image and the disk; everything that
/// shapes a build is refused rather than ignored.
fn validate_deploy(spec: &JobSpec) -> Result<(), JobError> {
    let deploy = spec.deploy.as_ref().ok_or_else(|| {
        JobError::new(
            "deploy",
            "is missing: a kind = \"deploy\" job needs [deploy] image = \"ID\"",
        )
    })?;
    at("deploy.image", check_job_id(&deploy.image))?;
    if let Some(h) = &deploy.manifest_blake3 {
        check(
            is_blake3_hex(h),
            "deploy.manifest_blake3",
            format!("{h:?} is not a BLAKE3 hash (64 lower-case hex digits)"),
        )?;
    }
    check(
        spec.disk.device == "auto"
            || (spec.disk.device.starts_with("/dev/")
                && check_target_path(&spec.disk.device).is_ok()),
        "disk.device",
        format!(
            "{:?} must be \"auto\" or a device path under /dev/",
            spec.disk.device
        ),
    )?;
    let building = [
        ("disk.partitions", !spec.disk.partitions.is_empty()),
        ("payloads", !spec.payloads.is_empty()),
        ("configure", spec.configure != Configure::default()),
        ("steps", !spec.steps.is_empty()),
        ("boot", spec.boot.is_some()),
        ("image", spec.image != ImageSpec::default()),
    ];
    for (field, set) in building {
        check(
            !set,
            field,
            "is for building; a deploy job writes the published image as it is",
        )?;
    }
    Ok(())
}

fn is_blake3_hex(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_boot(boot: &Boot, disk: &Disk, has_root: bool) -> Result<(), JobError> {
    check(
        has_root,
        "boot",
        "no partition mounts \"/\", so there is no system to boot",
    )?;
    check_len("boot.cmdline", &boot.cmdline, MAX_BOOT_CMDLINE)?;
    // The arguments are written between double quotes into a shell file
    // (/etc/default/grub.d) that update-grub sources.
    check(
        boot.cmdline
            .chars()
            .all(|c| c == ' ' || (c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '$' | '`'))),
        "boot.cmdline",
        "must be printable ASCII words without '\"', '\\', '$' or '`'",
    )?;
    if boot.firmware.uefi() {
        let esp = disk.partitions.iter().find(|p| p.kind == PartKind::Esp);
        check(
            esp.is_some(),
            "boot.firmware",
            format!(
                "{:?} needs an EFI system partition (kind = \"esp\")",
                boot.firmware
            ),
        )?;
        check(
            esp.is_some_and(|p| p.mount.is_some()),
            "boot.firmware",
            "the EFI system partition needs a mount (e.g. \"/boot/efi\") to install the loader into",
        )?;
    }
    if boot.firmware.bios() && disk.table == Table::Gpt {
        check(
            disk.partitions.iter().any(|p| p.kind == PartKind::BiosBoot),
            "boot.firmware",
            format!(
                "{:?} on a gpt table needs a bios-boot partition (kind = \"bios-boot\", fs = \"none\", 1MiB) for GRUB's core image",
                boot.firmware
            ),
        )?;
    }
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
    check_count(
        "disk.partitions",
        &disk.partitions,
        MAX_PARTITIONS,
        "partitions",
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
    check_count("configure.users", &c.users, MAX_USERS, "users")?;
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
        for (field, id) in [("uid", u.uid), ("gid", u.gid)] {
            if let Some(id) = id {
                check(
                    id != u32::MAX && id != u32::from(u16::MAX),
                    format!("{f}.{field}"),
                    format!(
                        "{id} is reserved: it means \"no id\" to the kernel or to 16-bit tools"
                    ),
                )?;
            }
        }
        check_count(format!("{f}.groups"), &u.groups, MAX_USER_GROUPS, "groups")?;
        for (j, g) in u.groups.iter().enumerate() {
            check(
                valid_account_name(g),
                format!("{f}.groups[{j}]"),
                format!("{g:?} is not a group name ([a-z_][a-z0-9_-]*, at most 32)"),
            )?;
        }
        validate_account_path(&format!("{f}.shell"), &u.shell)?;
        if let Some(h) = &u.home {
            validate_account_path(&format!("{f}.home"), h)?;
            validate_home(&format!("{f}.home"), &u.name, h)?;
        }
        if let Some(p) = &u.password_hash {
            check_len(format!("{f}.password_hash"), p, MAX_PASSWORD_HASH)?;
            check_account_field(format!("{f}.password_hash"), p, "/etc/shadow")?;
        }
        check_count(
            format!("{f}.authorized_keys"),
            &u.authorized_keys,
            MAX_AUTHORIZED_KEYS,
            "keys",
        )?;
        for (j, k) in u.authorized_keys.iter().enumerate() {
            check_len(format!("{f}.authorized_keys[{j}]"), k, MAX_AUTHORIZED_KEY)?;
            check(
                !k.trim().is_empty() && !k.contains(['\n', '\r', '\0']),
                format!("{f}.authorized_keys[{j}]"),
                "must be one non-empty line",
            )?;
        }
    }
    check_count("configure.files", &c.files, MAX_FILES, "files")?;
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
        check_len(format!("{f}.content"), &file.content, MAX_FILE_CONTENT)?;
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

/// A home or a shell: a path in the target that fits an /etc/passwd field.
fn validate_account_path(field: &str, path: &str) -> Result<(), JobError> {
    check_account_field(field, path, "/etc/passwd")?;
    check_len(field, path, MAX_ACCOUNT_PATH)?;
    at(field, check_target_path(path))
}

/// A home the agent may make its user's: not a system directory.
fn validate_home(field: &str, user: &str, home: &str) -> Result<(), JobError> {
    let dir = match home.trim_end_matches('/') {
        "" => "/",
        d => d,
    };
    let system = SYSTEM_DIRS.contains(&dir) && !(dir == "/root" && user == "root");
    check(
        !system,
        field,
        format!("{home:?} is a system directory, which the agent would hand to {user:?}"),
    )?;
    check(
        !PSEUDO_FS_DIRS.iter().any(|d| dir.starts_with(d)),
        field,
        format!("{home:?} is inside a kernel file system"),
    )
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
        assert!(j.image.generalize);
        assert_eq!(j.boot, None);
        assert!(j.configure.fstab);
    }

    const DEPLOY: &str = r#"
id = "web-01"
kind = "deploy"
[deploy]
image = "debian"
"#;

    #[test]
    fn a_deploy_job_names_an_image_and_nothing_to_build() {
        let j = parse_job(DEPLOY).unwrap();
        assert_eq!(j.kind, JobKind::Deploy);
        let d = j.deploy.unwrap();
        assert_eq!(d.image, "debian");
        assert!(d.grow && d.reboot);
        assert_eq!(d.manifest_blake3, None);
        assert_eq!(j.disk.device, "auto");
        let on = |extra: &str| parse_job(&format!("{DEPLOY}{extra}"));
        assert!(on("[disk]\ndevice = \"/dev/vda\"\npartitions = []\n").is_ok());
        for (extra, field) in [
            ("[[disk.partitions]]\nlabel = \"r\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\n", "disk.partitions"),
            ("[[payloads]]\nname = \"p.tar\"\n", "payloads"),
            ("[[steps]]\nname = \"s\"\nrun = \"true\"\n", "steps"),
            ("[configure]\nhostname = \"h\"\n", "configure"),
            ("[image]\ngeneralize = false\n", "image"),
            ("[disk]\ndevice = \"/etc/passwd\"\npartitions = []\n", "disk.device"),
        ] {
            let e = on(extra).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        let e = parse_job(&DEPLOY.replace("\"debian\"", "\"../images\"")).unwrap_err();
        assert_eq!(e.field, "deploy.image", "{e}");
        let e = parse_job(&format!("{DEPLOY}manifest_blake3 = \"XYZ\"\n")).unwrap_err();
        assert_eq!(e.field, "deploy.manifest_blake3", "{e}");
        let e = parse_job("id = \"a\"\nkind = \"deploy\"\n").unwrap_err();
        assert_eq!(e.field, "deploy", "{e}");
        let e = parse_job(&format!("{MINIMAL}[deploy]\nimage = \"x\"\n")).unwrap_err();
        assert_eq!(e.field, "deploy", "{e}");
        let e = parse_job("id = \"a\"\nkind = \"burn\"\n").unwrap_err();
        assert_eq!(e.field, "kind", "{e}");
    }

    #[test]
    fn syntax_errors_give_a_position() {
        let e = parse_job("id = \n").unwrap_err();
        assert!(e.problem.contains("line 1"), "{e}");
    }

    fn with_user(fields: &str) -> String {
        format!("{MINIMAL}[[configure.users]]\n{fields}\n")
    }

    #[test]
    fn time_limits_are_at_most_a_week() {
        let job = |limit: &str| parse_job(&format!("time_limit = \"{limit}\"\n{MINIMAL}"));
        assert_eq!(job("7days").unwrap().time_limit, TimeLimit::MAX);
        let e = job("10000y").unwrap_err();
        assert_eq!(e.field, "time_limit");
        assert!(e.problem.contains("longer than 7days"), "{e}");
        let step = |limit: &str| {
            parse_job(&format!(
                "{MINIMAL}[[steps]]\nname = \"s\"\nrun = \"true\"\ntime_limit = \"{limit}\"\n"
            ))
        };
        assert_eq!(step("7d").unwrap().steps[0].time_limit, TimeLimit::MAX);
        assert_eq!(step("8d").unwrap_err().field, "steps[0].time_limit");
        assert_eq!(
            parse_job(&format!(
                "{MINIMAL}[[steps]]\nname = \"s\"\nrun = \"true\"\n"
            ))
            .unwrap()
            .steps[0]
                .time_limit
                .as_secs(),
            600
        );
    }

    #[test]
    fn a_job_at_each_bound_is_accepted_and_one_past_it_refused() {
        let desc = |n: usize| parse_job(&format!("description = \"{}\"\n{MINIMAL}", "d".repeat(n)));
        desc(MAX_DESCRIPTION).unwrap();
        assert_eq!(desc(MAX_DESCRIPTION + 1).unwrap_err().field, "description");

        let steps = |n: usize| {
            let mut t = MINIMAL.to_string();
            for i in 0..n {
                t.push_str(&format!("[[steps]]\nname = \"s{i}\"\nrun = \"true\"\n"));
            }
            parse_job(&t)
        };
        steps(MAX_STEPS).unwrap();
        let e = steps(MAX_STEPS + 1).unwrap_err();
        assert_eq!(e.field, "steps");
        assert!(e.problem.contains(&MAX_STEPS.to_string()), "{e}");

        let run = |n: usize| {
            parse_job(&format!(
                "{MINIMAL}[[steps]]\nname = \"s\"\nrun = \"{}\"\n",
                "x".repeat(n)
            ))
        };
        run(MAX_STEP_RUN).unwrap();
        assert_eq!(run(MAX_STEP_RUN + 1).unwrap_err().field, "steps[0].run");

        let content = |n: usize| {
            parse_job(&format!(
                "{MINIMAL}[[configure.files]]\npath = \"/etc/a\"\ncontent = \"{}\"\n",
                "c".repeat(n)
            ))
        };
        content(MAX_FILE_CONTENT).unwrap();
        assert_eq!(
            content(MAX_FILE_CONTENT + 1).unwrap_err().field,
            "configure.files[0].content"
        );

        let groups = |n: usize| {
            let list: Vec<String> = (0..n).map(|i| format!("\"g{i}\"")).collect();
            parse_job(&with_user(&format!(
                "name = \"u\"\ngroups = [{}]",
                list.join(",")
            )))
        };
        groups(MAX_USER_GROUPS).unwrap();
        assert_eq!(
            groups(MAX_USER_GROUPS + 1).unwrap_err().field,
            "configure.users[0].groups"
        );
    }

    #[test]
    fn a_job_past_its_size_is_refused_before_parsing() {
        let mut text = MINIMAL.to_string();
        text.push('#');
        text.push_str(&"x".repeat(MAX_JOB_BYTES));
        let e = parse_job(&text).unwrap_err();
        assert_eq!(e.field, "");
        assert!(e.problem.contains("at most 1048576"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        std::fs::write(&path, &text).unwrap();
        let e = load_job(&path).unwrap_err();
        assert!(e.problem.contains("or more; at most 1048576"), "{e}");
        std::fs::write(&path, b"id = \"\xff\"").unwrap();
        assert!(load_job(&path).unwrap_err().problem.contains("not UTF-8"));
    }

    #[test]
    fn homes_and_shells_fit_passwd_and_spare_system_directories() {
        let user =
            |name: &str, extra: &str| parse_job(&with_user(&format!("name = \"{name}\"\n{extra}")));
        user("root", "home = \"/root\"").unwrap();
        user("ops", "home = \"/srv/ops/\"\nshell = \"/usr/bin/zsh\"").unwrap();
        user("postgres", "home = \"/var/lib/postgresql\"").unwrap();
        for (home, problem) in [
            ("/", "system directory"),
            ("/root", "system directory"),
            ("/usr/bin/", "system directory"),
            ("/var/tmp", "system directory"),
            ("/sys/kernel", "kernel file system"),
            ("/home/ops:x", "/etc/passwd"),
            ("/home/ops\\n", "/etc/passwd"),
        ] {
            let e = user("ops", &format!("home = \"{home}\"")).unwrap_err();
            assert_eq!(e.field, "configure.users[0].home", "{home}: {e}");
            assert!(e.problem.contains(problem), "{home}: {e}");
        }
        for shell in ["/bin/sh:", "/bin/sh\\r", "/bin/sh\\u0000"] {
            let e = user("ops", &format!("shell = \"{shell}\"")).unwrap_err();
            assert_eq!(e.field, "configure.users[0].shell", "{shell}: {e}");
        }
        let e = user("ops", "password_hash = \"x\\ny\"").unwrap_err();
        assert_eq!(e.field, "configure.users[0].password_hash");
        for id in ["uid = 4294967295", "gid = 65535"] {
            assert!(
                user("ops", id).unwrap_err().problem.contains("reserved"),
                "{id}"
            );
        }
        user("ops", "uid = 65534\ngid = 4294967294").unwrap();
    }

    #[test]
    fn boot_needs_the_partitions_its_firmware_loads_from() {
        const ESP: &str = "[[disk.partitions]]\nlabel = \"ESP\"\nsize = \"32MiB\"\nkind = \"esp\"\nfs = \"vfat\"\nmount = \"/boot/efi\"\n";
        const BIOS: &str = "[[disk.partitions]]\nlabel = \"bios\"\nsize = \"1MiB\"\nkind = \"bios-boot\"\nfs = \"none\"\n";
        let job_with = |table: &str, parts: &str, firmware: &str, cmdline: &str| {
            parse_job(&format!(
                "id = \"a\"\n[disk]\ntable = \"{table}\"\n{parts}{}[boot]\nfirmware = \"{firmware}\"\ncmdline = \"{cmdline}\"\n",
                MINIMAL.split_once("[disk]\n").unwrap().1
            ))
        };
        let job = |table: &str, parts: &str, firmware: &str| {
            job_with(table, parts, firmware, "console=ttyS0,115200 quiet")
        };
        let both = job("gpt", &format!("{ESP}{BIOS}"), "both").unwrap();
        let boot = both.boot.unwrap();
        assert!(boot.firmware.uefi() && boot.firmware.bios());
        assert_eq!(boot.loader, Loader::Grub);
        job("gpt", ESP, "uefi").unwrap();
        job("mbr", "", "bios").unwrap();
        let e = job("gpt", ESP, "both").unwrap_err();
        assert_eq!(e.field, "boot.firmware");
        assert!(e.problem.contains("bios-boot"), "{e}");
        let e = job("gpt", BIOS, "uefi").unwrap_err();
        assert!(e.problem.contains("EFI system partition"), "{e}");
        for bad in ["a\\\"b", "$(reboot)", "`x`", "a\\nb", "\\\\"] {
            let e = job_with("gpt", ESP, "uefi", bad).unwrap_err();
            assert_eq!(e.field, "boot.cmdline", "{bad}: {e}");
        }
        job_with("gpt", ESP, "uefi", &"x".repeat(MAX_BOOT_CMDLINE)).unwrap();
        let e = job_with("gpt", ESP, "uefi", &"x".repeat(MAX_BOOT_CMDLINE + 1)).unwrap_err();
        assert_eq!(e.field, "boot.cmdline");
    }

    #[test]
    fn the_default_home_passes_its_own_checks() {
        for name in ["root", "ops"] {
            let job = parse_job(&with_user(&format!("name = \"{name}\""))).unwrap();
            let home = job.configure.users[0].home_dir();
            let explicit = with_user(&format!("name = \"{name}\"\nhome = \"{home}\""));
            parse_job(&explicit).unwrap();
        }
    }
}
