//! The master's image signing key, `master/image-signing-key` (mode 0600)
//! with its public half beside it. `kiln-master init` makes it; a master
//! that publishes without one makes it then. Creation never replaces a key:
//! two masters racing both end up with the one that was linked first.

use crate::error::IoContext;
use crate::master::{MasterError, Result};
use crate::signature::{SigningKey, DEFAULT_PRINCIPAL};
use crate::spool::{SpoolFs, SIGNING_KEY, SIGNING_KEY_PUB};

/// Largest key file read (an Ed25519 one is about 400 bytes).
const MAX_KEY: u64 = 64 << 10;

/// The signing key, if the spool has one.
pub fn load_key(fs: &dyn SpoolFs) -> Result<Option<SigningKey>> {
    let Some(bytes) = fs
        .read_capped(SIGNING_KEY, MAX_KEY)
        .ctx(|| format!("reading {SIGNING_KEY}"))?
    else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| MasterError::SigningKey(format!("{SIGNING_KEY}: is not UTF-8")))?;
    let key = SigningKey::parse(&text)
        .map_err(|e| MasterError::SigningKey(format!("{SIGNING_KEY}: {e}")))?;
    Ok(Some(key))
}

/// The signing key, made first if the spool has none. The flag says whether
/// this call made it.
pub fn load_or_create_key(fs: &dyn SpoolFs) -> Result<(SigningKey, bool)> {
    if let Some(key) = load_key(fs)? {
        write_public_if_missing(fs, &key)?;
        return Ok((key, false));
    }
    let key = SigningKey::generate(DEFAULT_PRINCIPAL)
        .map_err(|e| MasterError::SigningKey(format!("{SIGNING_KEY}: {e}")))?;
    let created = fs
        .create_private(SIGNING_KEY, key.to_openssh().as_bytes())
        .ctx(|| format!("creating {SIGNING_KEY}"))?;
    if !created {
        // Another master made one meanwhile: that one signs.
        let key = load_key(fs)?
            .ok_or_else(|| MasterError::SigningKey(format!("{SIGNING_KEY}: vanished")))?;
        write_public_if_missing(fs, &key)?;
        return Ok((key, false));
    }
    write_public_if_missing(fs, &key)?;
    tracing::info!(
        "created the image signing key {SIGNING_KEY} ({})",
        key.fingerprint()
    );
    Ok((key, true))
}

fn write_public_if_missing(fs: &dyn SpoolFs, key: &SigningKey) -> Result<()> {
    let line = format!("{}\n", key.public_line());
    if fs.read_opt(SIGNING_KEY_PUB).ok().flatten().as_deref() != Some(line.as_bytes()) {
        fs.write_atomic(SIGNING_KEY_PUB, line.as_bytes())
            .ctx(|| format!("writing {SIGNING_KEY_PUB}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::LocalSpool;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSpool::new(dir.path());
        crate::master::init(&s).unwrap();
        assert!(load_key(&s).unwrap().is_none());
        let (key, created) = load_or_create_key(&s).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(SIGNING_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let (again, created) = load_or_create_key(&s).unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint(), key.fingerprint());
        let public = std::fs::read_to_string(dir.path().join(SIGNING_KEY_PUB)).unwrap();
        assert_eq!(public.trim_end(), key.public_line().trim_end());
    }

    #[test]
    fn a_damaged_key_is_named_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSpool::new(dir.path());
        crate::master::init(&s).unwrap();
        std::fs::write(dir.path().join(SIGNING_KEY), "not a key").unwrap();
        let Err(e) = load_or_create_key(&s) else {
            panic!("a damaged key was taken");
        };
        let e = e.to_string();
        assert!(e.starts_with(SIGNING_KEY), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(SIGNING_KEY)).unwrap(),
            "not a key"
        );
    }
}
