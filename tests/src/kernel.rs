//! Debian's kernel for the VMs, fetched into the build cache by
//! `scripts/fetch-kernel.sh` the first time a test needs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The repository root (the workspace holding this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The cache directory (`.cache/kernel`, or `$KILN_CACHE/kernel`).
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    pub modules: PathBuf,
    pub version: String,
}

/// The kernel, fetched once per process (the script itself locks against
/// other processes).
pub fn kernel() -> Result<Kernel> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| fetch().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn fetch() -> Result<Kernel> {
    let script = repo_root().join("scripts/fetch-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .with_context(|| format!("{} printed no directory", script.display()))?,
    );
    let version_file = dir.join("version");
    let version = std::fs::read_to_string(&version_file)
        .with_context(|| format!("reading {}", version_file.display()))?
        .trim()
        .to_owned();
    Ok(Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: dir.join("lib/modules").join(&version),
        version,
        dir,
    })
}
