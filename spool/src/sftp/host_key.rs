//! Pinned host keys: parsing an `authorized_keys`-style line and
//! fingerprints as OpenSSH prints them.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha256};

/// A public key from a line `ssh-ed25519 AAAA... comment`.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    pub algorithm: String,
    /// The key blob, as the server sends it during key exchange.
    pub blob: Vec<u8>,
    pub comment: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({} {})", self.algorithm, self.fingerprint())
    }
}

/// `SHA256:` and the unpadded base64 of the blob's SHA-256, as `ssh-keygen -l` prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

/// The key type a blob names: it starts with its own type as an SSH string.
pub fn blob_algorithm(blob: &[u8]) -> String {
    let inner = blob
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    String::from_utf8_lossy(inner.unwrap_or(b"unknown")).into_owned()
}

impl HostKey {
    /// Parses `ALGORITHM BASE64 [COMMENT]`, the format of a `.pub` file and
    /// of `authorized_keys` without options. A known_hosts line's leading
    /// host pattern is skipped.
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| is_key_type(w)) else {
            return Err(format!(
                "{:?} holds no key type (ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...)",
                shorten(line)
            ));
        };
        let algorithm = words[at].to_string();
        let Some(b64) = words.get(at + 1) else {
            return Err(format!("{algorithm} key has no base64 key data"));
        };
        let blob = STANDARD
            .decode(b64)
            .map_err(|e| format!("{algorithm} key data is not base64: {e}"))?;
        if blob_algorithm(&blob) != algorithm {
            return Err(format!(
                "key data does not hold a {algorithm} key ({})",
                fingerprint(&blob)
            ));
        }
        Ok(HostKey {
            algorithm,
            blob,
            comment: words[at + 2..].join(" "),
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }
}

fn is_key_type(w: &str) -> bool {
    w.starts_with("ssh-") || w.starts_with("ecdsa-sha2-") || w.starts_with("sk-")
}

fn shorten(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Printed by `ssh-keygen -l -f` for this key:
    // 256 SHA256:0GaZ1ZARjdr4HeRMvg3yNqEcN8viRARJqDil3ZkDRuk test (ED25519)
    const LINE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICJTd1JHEGTfE/O3tJwsxsR1gWbjn/9IrGiE9rFK6LEY test";

    #[test]
    fn parses_and_fingerprints_like_ssh_keygen() {
        let k = HostKey::parse(LINE).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "test");
        assert_eq!(
            k.fingerprint(),
            "SHA256:0GaZ1ZARjdr4HeRMvg3yNqEcN8viRARJqDil3ZkDRuk"
        );
        let kh = HostKey::parse(&format!("[127.0.0.1]:2222 {LINE}")).unwrap();
        assert_eq!(kh, k);
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "AAAA",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAICJTd1JHEGTfE/O3tJwsxsR1gWbjn/9IrGiE9rFK6LEY",
        ] {
            assert!(HostKey::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
