//! The project's own programs that tests run as an operator would:
//! `kiln-master` (built once per test process) and the static agent.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::kernel::repo_root;

pub const MUSL: &str = "x86_64-unknown-linux-musl";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Runs cargo in the workspace; the error holds its stderr.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{cargo} {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn once(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    build: fn() -> Result<PathBuf>,
) -> Result<PathBuf> {
    cell.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The `kiln-master` binary: `$KILN_MASTER`, or built (debug) the first time.
pub fn kiln_master() -> Result<PathBuf> {
    static MASTER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&MASTER, || match std::env::var_os("KILN_MASTER") {
        Some(p) => Ok(PathBuf::from(p)),
        None => {
            cargo(&["build", "-p", "kiln-master"])?;
            Ok(target_dir().join("debug/kiln-master"))
        }
    })
}

/// The static agent, the initramfs's /init: `$KILN_AGENT`, or built
/// (release, musl) the first time.
pub fn kiln_agent_musl() -> Result<PathBuf> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&AGENT, || match std::env::var_os("KILN_AGENT") {
        Some(p) => Ok(PathBuf::from(p)),
        None => {
            cargo(&["build", "--release", "--target", MUSL, "-p", "kiln-agent"])?;
            Ok(target_dir().join(MUSL).join("release/kiln-agent"))
        }
    })
}
