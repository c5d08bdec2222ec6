//! External commands of the set-up (useradd, usermod, getent, ssh-keygen,
//! sshd): each runs through [`run`], which logs its argv and puts the tail
//! of its stderr into the error.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Lines of stderr kept in an error.
const STDERR_TAIL: usize = 5;

/// Runs `cmd` with no input; returns its stdout. `hint` says which package
/// provides the program, for when it is missing.
pub fn run(cmd: &mut Command, hint: &str) -> Result<String> {
    let argv = argv(cmd);
    tracing::info!(%argv, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {argv} ({hint})"))?;
    if !out.status.success() {
        bail!(
            "{argv} failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as one string, for logs and errors.
pub fn argv(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last lines of a command's stderr, on one line.
pub fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(STDERR_TAIL)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_command_and_its_stderr() {
        let e = run(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]),
            "install dash",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("sh -c echo one"), "{e}");
        assert!(e.contains("one / two"), "{e}");
    }

    #[test]
    fn a_missing_program_names_its_package() {
        let e = run(&mut Command::new("kiln-no-such-program"), "install kiln")
            .unwrap_err()
            .to_string();
        assert!(e.contains("(install kiln)"), "{e}");
    }
}
