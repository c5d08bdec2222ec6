//! What `kiln-master show` and `verify` read of a publication: the signed
//! manifest with its provenance, the signature, and whether the image still
//! matches both.

use crate::error::IoContext;
use crate::manifest::ImageManifest;
use crate::master::signing::load_key;
use crate::master::{MasterError, Result};
use crate::signature::{AllowedSigners, MAX_SIGNATURE};
use crate::spool::{image_dir, SpoolFs, SIGNING_KEY};
use crate::stream;
use crate::untrusted::MAX_UPLOAD_RECORD;
use crate::upload::{Published, IMAGE_FILE, MANIFEST, PUBLISHED, SIGNATURE};

/// A published image as it lies in `images/<id>/`.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub id: String,
    pub published: Published,
    /// The manifest's bytes, as signed.
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    /// BLAKE3 of `manifest.toml`: what deploy jobs pin.
    pub manifest_blake3: String,
    /// The text of `manifest.toml.sig`; `None` for an image published
    /// before images were signed.
    pub signature: Option<String>,
}

/// Whether a signature holds, and by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Verified; the fingerprint of the key that signed.
    Valid(String),
    Missing,
    Invalid(String),
    /// There is no key to check it with (the master has none, or it is
    /// damaged): why.
    Unchecked(String),
}

impl std::fmt::Display for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureCheck::Valid(p) => write!(f, "verifies (signed by {p})"),
            SignatureCheck::Missing => write!(f, "missing: there is no {SIGNATURE}"),
            SignatureCheck::Invalid(why) => write!(f, "does NOT verify: {why}"),
            SignatureCheck::Unchecked(why) => write!(f, "cannot be checked: {why}"),
        }
    }
}

/// The files of `images/<id>/` as they lie, before anything is trusted:
/// what [`read_image`] and [`verify_image`] both start from.
struct Files {
    published_path: String,
    published: std::result::Result<Published, String>,
    manifest_path: String,
    manifest_bytes: Option<Vec<u8>>,
    sig_path: String,
    signature: Option<String>,
}

/// Reads `images/<id>/`'s record, manifest and signature, each capped;
/// `None` if there is no `published.toml`.
fn read_files(fs: &dyn SpoolFs, id: &str) -> Result<Option<Files>> {
    crate::names::check_job_id(id).map_err(|p| MasterError::BadInput(format!("image id {p}")))?;
    let dir = image_dir(id);
    let published_path = format!("{dir}/{PUBLISHED}");
    let Some(bytes) = fs
        .read_capped(&published_path, 64 << 10)
        .ctx(|| format!("reading {published_path}"))?
    else {
        return Ok(None);
    };
    let published = Published::parse(&String::from_utf8_lossy(&bytes))
        .map_err(|e| format!("{published_path}: {e}"));
    let manifest_path = format!("{dir}/{MANIFEST}");
    let manifest_bytes = fs
        .read_capped(&manifest_path, MAX_UPLOAD_RECORD)
        .ctx(|| format!("reading {manifest_path}"))?;
    let sig_path = format!("{dir}/{SIGNATURE}");
    let signature = fs
        .read_capped(&sig_path, MAX_SIGNATURE)
        .ctx(|| format!("reading {sig_path}"))?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok(Some(Files {
        published_path,
        published,
        manifest_path,
        manifest_bytes,
        sig_path,
        signature,
    }))
}

/// Reads `images/<id>/`; `None` if `id` is not a published image.
pub fn read_image(fs: &dyn SpoolFs, id: &str) -> Result<Option<ImageRecord>> {
    let Some(f) = read_files(fs, id)? else {
        return Ok(None);
    };
    let published = f.published.map_err(MasterError::BadInput)?;
    let manifest_bytes = f
        .manifest_bytes
        .ok_or_else(|| MasterError::BadInput(format!("{} is missing", f.manifest_path)))?;
    let manifest = ImageManifest::parse(&String::from_utf8_lossy(&manifest_bytes))
        .map_err(|e| MasterError::BadInput(format!("{}: {e}", f.manifest_path)))?;
    Ok(Some(ImageRecord {
        id: id.to_string(),
        published,
        manifest_blake3: blake3::hash(&manifest_bytes).to_hex().to_string(),
        manifest_bytes,
        manifest,
        signature: f.signature,
    }))
}

/// The master's own key as the one allowed signer.
pub fn master_signers(fs: &dyn SpoolFs) -> Result<AllowedSigners> {
    let key = load_key(fs)?.ok_or_else(|| {
        MasterError::SigningKey(format!(
            "{SIGNING_KEY} is missing: the master has no signing key (`kiln-master init` makes one)"
        ))
    })?;
    let line = key.allowed_signers_line(crate::signature::DEFAULT_PRINCIPAL);
    AllowedSigners::parse(&line).map_err(|e| MasterError::SigningKey(format!("{SIGNING_KEY}: {e}")))
}

impl ImageRecord {
    /// Checks `manifest.toml.sig` against `signers`.
    pub fn check_signature(&self, signers: &AllowedSigners) -> SignatureCheck {
        match &self.signature {
            None => SignatureCheck::Missing,
            Some(sig) => match signers.verify(&self.manifest_bytes, sig) {
                Ok(principal) => SignatureCheck::Valid(principal),
                Err(e) => SignatureCheck::Invalid(e.to_string()),
            },
        }
    }
}

/// What `verify` found, when everything holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The fingerprint of the key that signed.
    pub signer: String,
    pub image_size: u64,
    pub image_blake3: String,
    pub manifest_blake3: String,
}

/// Checks a publication end to end: the signature over `manifest.toml`,
/// the manifest against `published.toml`, and the image file's size and
/// BLAKE3 (streamed) against the manifest. `Err` names the file and the
/// mismatch.
pub fn verify_image(
    fs: &dyn SpoolFs,
    id: &str,
    signers: &AllowedSigners,
) -> Result<std::result::Result<Verified, String>> {
    let Some(f) = read_files(fs, id)? else {
        return Err(MasterError::BadInput(format!(
            "{id:?} is not a published image: there is no {}/{PUBLISHED}",
            image_dir(id)
        )));
    };
    let Files {
        published_path,
        published,
        manifest_path,
        manifest_bytes,
        sig_path,
        signature,
    } = f;
    let dir = image_dir(id);
    let published = match published {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    // The signature first, over the bytes as they are: a manifest that
    // was changed is reported as such, not as whatever parsing finds.
    let Some(manifest_bytes) = manifest_bytes else {
        return Ok(Err(format!("{manifest_path} is missing")));
    };
    let Some(sig) = signature else {
        return Ok(Err(format!("{sig_path} is missing")));
    };
    let signer = match signers.verify(&manifest_bytes, &sig) {
        Ok(s) => s,
        Err(why) => {
            return Ok(Err(format!(
                "{sig_path} does not verify {manifest_path}: {why}"
            )))
        }
    };
    let m = match ImageManifest::parse(&String::from_utf8_lossy(&manifest_bytes)) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("{manifest_path}: {e}"))),
    };
    let m = &m;
    if m.job != id {
        return Ok(Err(format!(
            "{manifest_path}: job is {:?}, not {id:?}",
            m.job.escape_debug().to_string()
        )));
    }
    if m.image_blake3 != published.image_blake3 || m.image_size != published.image_size {
        return Ok(Err(format!(
            "{manifest_path} and {published_path} disagree on the image's size or BLAKE3"
        )));
    }
    let path = format!("{dir}/{IMAGE_FILE}");
    let r = match fs.open_read(&path) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("opening {path}: {e}"))),
    };
    let d = match stream::digest(r) {
        Ok(d) => d,
        Err(e) => return Ok(Err(format!("reading {path}: {e}"))),
    };
    if d.size != m.image_size {
        return Ok(Err(format!(
            "{path} is {} bytes, {MANIFEST} says image_size = {}",
            d.size, m.image_size
        )));
    }
    if d.blake3 != m.image_blake3 {
        return Ok(Err(format!(
            "{path} has BLAKE3 {}, {MANIFEST} says image_blake3 = {}",
            d.blake3, m.image_blake3
        )));
    }
    Ok(Ok(Verified {
        signer,
        image_size: d.size,
        image_blake3: d.blake3,
        manifest_blake3: blake3::hash(&manifest_bytes).to_hex().to_string(),
    }))
}
