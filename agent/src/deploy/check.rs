//! The signed manifest: its SSH signature is checked against the allowed
//! signers first, then its shape, before anything else trusts it.

use std::path::Path;

use kiln_spool::manifest::ImageManifest;
use kiln_spool::signature::{AllowedSigners, MAX_SIGNATURE};

use crate::error::{Error, Result};

/// Longest manifest read, in bytes (a manifest lists ranges and provenance).
pub const MAX_MANIFEST: u64 = 64 << 20;
/// Data ranges start and end on this boundary (the smallest sector).
const SECTOR: u64 = 512;

/// A manifest whose signature was made by an allowed signer.
#[derive(Debug, Clone)]
pub struct SignedImage {
    pub manifest: ImageManifest,
    pub manifest_text: String,
    /// BLAKE3 of the manifest's bytes.
    pub manifest_blake3: String,
    /// The signing key's fingerprint, `SHA256:...`.
    pub signer: String,
}

/// Checks the signature of the manifest bytes against the allowed signers,
/// then parses and sanity-checks the manifest (ranges sorted,
/// non-overlapping, inside `disk_size`, sector-aligned, format `raw.zst`).
pub fn check_signed(
    manifest_bytes: &[u8],
    signature: &str,
    signers: &AllowedSigners,
) -> Result<SignedImage> {
    if signers.is_empty() {
        return Err(Error::Input(
            "no allowed image signer: give the line `kiln-master signer` prints".into(),
        ));
    }
    let signer = signers
        .verify(manifest_bytes, signature)
        .map_err(|e| Error::Input(format!("the manifest's signature: {e}")))?;
    let text = std::str::from_utf8(manifest_bytes)
        .map_err(|_| Error::Input("the manifest is not UTF-8 text".into()))?;
    let manifest = ImageManifest::parse(text)
        .map_err(|e| Error::Input(format!("the manifest: {}", e.to_string().trim_end())))?;
    check_shape(&manifest).map_err(|e| Error::Input(format!("the manifest: {e}")))?;
    let manifest_blake3 = kiln_spool::stream::digest(manifest_bytes)
        .map_err(|e| Error::Input(format!("hashing the manifest: {e}")))?
        .blake3;
    Ok(SignedImage {
        manifest,
        manifest_text: text.to_string(),
        manifest_blake3,
        signer,
    })
}

/// Reads the manifest and its signature and checks them with
/// [`check_signed`]; errors name the file.
pub fn load_signed(
    manifest: &Path,
    signature: &Path,
    signers: &AllowedSigners,
) -> Result<SignedImage> {
    let bytes = read_limited(manifest, MAX_MANIFEST)?;
    let sig = read_limited(signature, MAX_SIGNATURE)?;
    let sig = String::from_utf8(sig)
        .map_err(|_| Error::Input(format!("{}: not an SSH signature", signature.display())))?;
    check_signed(&bytes, &sig, signers).map_err(|e| match e {
        Error::Input(m) if m.starts_with("the manifest's signature") => Error::Input(format!(
            "{}: {m} ({})",
            manifest.display(),
            signature.display()
        )),
        Error::Input(m) => Error::Input(format!("{}: {m}", manifest.display())),
        e => e,
    })
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut out))
        .map_err(|e| Error::Input(format!("{}: cannot read: {e}", path.display())))?;
    if out.len() as u64 > max {
        return Err(Error::Input(format!(
            "{}: longer than {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

fn is_blake3_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The manifest's own consistency: what the deploy relies on when it
/// writes range by range.
pub fn check_shape(m: &ImageManifest) -> std::result::Result<(), String> {
    if m.format != "raw.zst" {
        return Err(format!("format: {:?} is not \"raw.zst\"", m.format));
    }
    if m.block_size < 512 || !m.block_size.is_power_of_two() {
        return Err(format!(
            "block_size: {} is not a power of two of at least 512",
            m.block_size
        ));
    }
    if m.disk_size == 0 || !m.disk_size.is_multiple_of(512) {
        return Err(format!(
            "disk_size: {} is not a positive multiple of 512",
            m.disk_size
        ));
    }
    if m.image_size == 0 {
        return Err("image_size: 0".into());
    }
    if !is_blake3_hex(&m.image_blake3) {
        return Err(format!(
            "image_blake3: {:?} is not a BLAKE3 in hex",
            m.image_blake3
        ));
    }
    let mut prev_end = 0u64;
    for (i, r) in m.ranges.iter().enumerate() {
        let field = format!("ranges[{i}]");
        let end = r
            .offset
            .checked_add(r.length)
            .ok_or_else(|| format!("{field}: offset + length overflows"))?;
        if r.length == 0 {
            return Err(format!("{field}: length is 0"));
        }
        if r.offset < prev_end {
            return Err(format!(
                "{field}: starts at byte {}, before the previous range ends at {prev_end} (ranges must be sorted and must not overlap)",
                r.offset
            ));
        }
        if end > m.disk_size {
            return Err(format!(
                "{field}: ends at byte {end}, past the disk's {} bytes",
                m.disk_size
            ));
        }
        // Capture maps in sectors where a filesystem's allocation unit is smaller than its block.
        if !r.offset.is_multiple_of(SECTOR) || !(end.is_multiple_of(SECTOR) || end == m.disk_size) {
            return Err(format!(
                "{field}: bytes {}..{end} are not aligned to {SECTOR}-byte sectors",
                r.offset
            ));
        }
        if !is_blake3_hex(&r.blake3) {
            return Err(format!(
                "{field}.blake3: {:?} is not a BLAKE3 in hex",
                r.blake3
            ));
        }
        prev_end = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::manifest::DataRange;
    use kiln_spool::signature::SigningKey;
    use kiln_spool::time::Timestamp;

    fn manifest(ranges: Vec<(u64, u64)>) -> ImageManifest {
        ImageManifest {
            format: "raw.zst".into(),
            job: "web-01".into(),
            job_blake3: String::new(),
            agent: "a".into(),
            disk_size: 64 << 20,
            block_size: 4096,
            bytes_read: 0,
            image_size: 100,
            image_blake3: "a".repeat(64),
            payloads: vec![],
            started: Timestamp(0),
            finished: Timestamp(0),
            phases: vec![],
            ranges: ranges
                .into_iter()
                .map(|(offset, length)| DataRange {
                    offset,
                    length,
                    blake3: "b".repeat(64),
                })
                .collect(),
            generalized: vec![],
            provenance: None,
        }
    }

    #[test]
    fn a_signed_manifest_is_accepted_and_names_its_signer() {
        let key = SigningKey::generate("test").unwrap();
        let signers = AllowedSigners::parse(&key.allowed_signers_line("kiln-master")).unwrap();
        let text = manifest(vec![(0, 1 << 20)]).to_toml();
        let sig = key.sign(text.as_bytes()).unwrap();
        let s = check_signed(text.as_bytes(), &sig, &signers).unwrap();
        assert_eq!(s.signer, key.fingerprint());
        assert_eq!(s.manifest_text, text);
        assert_eq!(
            s.manifest_blake3,
            blake3::hash(text.as_bytes()).to_hex().to_string()
        );
    }

    #[test]
    fn a_changed_manifest_or_an_unknown_key_is_refused() {
        let key = SigningKey::generate("test").unwrap();
        let other = SigningKey::generate("other").unwrap();
        let signers = AllowedSigners::parse(&key.allowed_signers_line("kiln-master")).unwrap();
        let text = manifest(vec![(0, 1 << 20)]).to_toml();
        let sig = key.sign(text.as_bytes()).unwrap();
        let changed = text.replace("web-01", "web-02");
        let e = check_signed(changed.as_bytes(), &sig, &signers).unwrap_err();
        assert!(e.is_input());
        assert!(e.to_string().contains("changed after signing"), "{e}");
        let theirs = other.sign(text.as_bytes()).unwrap();
        let e = check_signed(text.as_bytes(), &theirs, &signers).unwrap_err();
        assert!(e.to_string().contains("not an allowed signer"), "{e}");
        let e = check_signed(text.as_bytes(), &sig, &AllowedSigners::default()).unwrap_err();
        assert!(e.to_string().contains("kiln-master signer"), "{e}");
    }

    #[test]
    fn ranges_must_be_sorted_disjoint_aligned_and_inside_the_disk() {
        assert_eq!(
            check_shape(&manifest(vec![(0, 4096), (8192, 4096)])),
            Ok(())
        );
        let e = check_shape(&manifest(vec![(8192, 4096), (0, 4096)])).unwrap_err();
        assert!(e.starts_with("ranges[1]: starts at byte 0"), "{e}");
        let e = check_shape(&manifest(vec![(0, 8192), (4096, 4096)])).unwrap_err();
        assert!(e.contains("must not overlap"), "{e}");
        let e = check_shape(&manifest(vec![(100, 4096)])).unwrap_err();
        assert!(e.contains("not aligned"), "{e}");
        let e = check_shape(&manifest(vec![(64 << 20, 4096)])).unwrap_err();
        assert!(e.contains("past the disk"), "{e}");
        let e = check_shape(&manifest(vec![(u64::MAX - 10, 4096)])).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        let mut m = manifest(vec![]);
        m.format = "qcow2".into();
        assert!(check_shape(&m).unwrap_err().starts_with("format"));
    }
}
