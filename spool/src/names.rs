//! The checks that keep names from job files inside the spool and the target:
//! job ids, payload names (relative to `payloads/`) and target paths.

/// Longest payload name, in bytes.
pub const MAX_PAYLOAD_NAME: usize = 1024;
/// Longest target path, in bytes.
pub const MAX_TARGET_PATH: usize = 4096;

/// A job id: `[a-z0-9][a-z0-9._-]{0,62}`. It names files in the spool, so it
/// can never hold a separator, `..` or a leading dot.
pub fn check_job_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > 63 {
        return Err(format!(
            "is {} characters long; at most 63 are allowed",
            id.len()
        ));
    }
    let mut chars = id.chars();
    let first = chars.next().unwrap_or('-');
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!(
            "{id:?} must start with a lower-case letter or a digit"
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{:?} holds {bad:?}; only a-z, 0-9, '.', '_' and '-' are allowed",
            id.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// A payload name: a relative path of plain components under `payloads/`.
pub fn check_payload_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_PAYLOAD_NAME {
        return Err(format!(
            "is {} bytes long; at most {MAX_PAYLOAD_NAME} are allowed",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("holds a NUL byte".into());
    }
    if name.starts_with('/') {
        return Err(format!(
            "{name:?} is absolute; name a file under the spool's payloads/"
        ));
    }
    for comp in name.split('/') {
        check_component(name, comp)?;
    }
    Ok(())
}

fn check_component(whole: &str, comp: &str) -> Result<(), String> {
    match comp {
        "" => Err(format!("{whole:?} has an empty path component")),
        "." | ".." => Err(format!(
            "{whole:?} has a {comp:?} component; it must stay inside its directory"
        )),
        c if c.len() > 255 => Err(format!("{whole:?} has a component longer than 255 bytes")),
        c if c.chars().any(|ch| ch.is_control()) => Err(format!(
            "{:?} holds a control character",
            whole.escape_debug().to_string()
        )),
        _ => Ok(()),
    }
}

/// An absolute path inside the target filesystem: starts with `/`, has no
/// `.` or `..` components, no NUL and no empty components (except `/` itself).
pub fn check_target_path(path: &str) -> Result<(), String> {
    if path.contains('\0') {
        return Err("holds a NUL byte".into());
    }
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute path"));
    }
    if path.len() > MAX_TARGET_PATH {
        return Err(format!(
            "is {} bytes long; at most {MAX_TARGET_PATH} are allowed",
            path.len()
        ));
    }
    if path == "/" {
        return Ok(());
    }
    let rest = path.trim_start_matches('/');
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    for comp in rest.split('/') {
        check_component(path, comp)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        for ok in ["a", "web-01", "0.x_y", &"a".repeat(63)] {
            check_job_id(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "A",
            "a/b",
            "../x",
            "a b",
            "a\0",
            &"a".repeat(64),
        ] {
            assert!(check_job_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn payload_names() {
        for ok in ["os.tar.zst", "apps/web/v1.tar"] {
            check_payload_name(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "a\0b",
            "./a",
            &"a/".repeat(600),
        ] {
            assert!(check_payload_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn target_paths() {
        for ok in ["/", "/boot/efi", "/srv/data/"] {
            check_target_path(ok).unwrap();
        }
        for bad in ["boot", "/a/../b", "/a//b", "/./a", "/a\0", ""] {
            assert!(check_target_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
