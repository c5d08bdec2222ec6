//! Runs the real `kiln-master` binary on a spool, for the CLI tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn kiln(spool: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-master"))
        .arg("--spool")
        .arg(spool)
        .args(args)
        .env_remove("KILN_SPOOL")
        .output()
        .expect("running kiln-master")
}

/// [`kiln`], which must succeed; its stdout.
pub fn kiln_ok(spool: &Path, args: &[&str]) -> String {
    let out = kiln(spool, args);
    assert!(
        out.status.success(),
        "kiln-master {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
