//! Runs the real `kiln-master` binary on a spool, for the CLI tests.

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
