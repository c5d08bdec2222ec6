//! Image signatures: the master signs each published manifest with its own
//! Ed25519 key as an SSH signature (the `ssh-keygen -Y sign` format, in the
//! [`NAMESPACE`] namespace), so that stock OpenSSH checks it:
//!
//! ```text
//! ssh-keygen -Y verify -f allowed_signers -I kiln-master -n kiln-image \
//!     -s manifest.toml.sig < manifest.toml
//! ```
//!
//! The signature covers the manifest's bytes; the manifest covers the image
//! (its BLAKE3, and each data range's). The agent checks the same signature
//! with [`AllowedSigners::verify`] before it writes anything to a disk.

use std::path::Path;

use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

/// The namespace of every kiln image signature: a signature made for
/// another purpose (a git commit, a file) never passes for an image's.
pub const NAMESPACE: &str = "kiln-image";
/// The principal the master's key is printed under in allowed-signers
/// lines, unless the operator names another.
pub const DEFAULT_PRINCIPAL: &str = "kiln-master";
/// Longest signature file read, in bytes (an Ed25519 one is about 300).
pub const MAX_SIGNATURE: u64 = 16 << 10;
/// Longest allowed-signers file read, in bytes.
pub const MAX_ALLOWED_SIGNERS: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("{0}")]
    Key(String),
    #[error("the signature is not an SSH signature: {0}")]
    Malformed(String),
    #[error("the signature is for namespace {found:?}, not {NAMESPACE:?}")]
    Namespace { found: String },
    #[error("the signature was made by {key}, which is not an allowed signer")]
    UnknownSigner { key: String },
    #[error("the signature by {key} does not match the signed data: it was changed after signing")]
    Mismatch { key: String },
    #[error("{0}")]
    AllowedSigners(String),
}

/// The master's signing key.
pub struct SigningKey {
    key: PrivateKey,
}

impl SigningKey {
    /// Makes a new Ed25519 key.
    pub fn generate(comment: &str) -> Result<SigningKey, SignatureError> {
        let mut key =
            PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
                .map_err(|e| SignatureError::Key(format!("generating an Ed25519 key: {e}")))?;
        key.set_comment(comment);
        Ok(SigningKey { key })
    }

    /// Reads an unencrypted OpenSSH private key (`ssh-keygen -t ed25519 -N ''`).
    pub fn parse(text: &str) -> Result<SigningKey, SignatureError> {
        let key = PrivateKey::from_openssh(text)
            .map_err(|e| SignatureError::Key(format!("not an OpenSSH private key: {e}")))?;
        if key.is_encrypted() {
            return Err(SignatureError::Key(
                "the key is encrypted with a passphrase; the master signs unattended".into(),
            ));
        }
        if key.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(SignatureError::Key(format!(
                "the key is {}, kiln signs with ssh-ed25519",
                key.algorithm()
            )));
        }
        Ok(SigningKey { key })
    }

    pub fn load(path: &Path) -> Result<SigningKey, SignatureError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SignatureError::Key(format!("reading {}: {e}", path.display())))?;
        SigningKey::parse(&text)
            .map_err(|e| SignatureError::Key(format!("{}: {e}", path.display())))
    }

    /// The private key in OpenSSH's format, for a 0600 file.
    pub fn to_openssh(&self) -> String {
        self.key
            .to_openssh(LineEnding::LF)
            .expect("an Ed25519 key always encodes")
            .to_string()
    }

    /// The public key line, `ssh-ed25519 AAAA... comment`.
    pub fn public_line(&self) -> String {
        self.key
            .public_key()
            .to_openssh()
            .expect("an Ed25519 key always encodes")
    }

    /// The line for an allowed-signers file (`ssh-keygen -Y verify -f`,
    /// and the agent's `image_signers`).
    pub fn allowed_signers_line(&self, principal: &str) -> String {
        allowed_signers_line(self.key.public_key(), principal)
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    /// Signs `message`; returns the armored signature (`-----BEGIN SSH
    /// SIGNATURE-----`), as `ssh-keygen -Y sign` writes it.
    pub fn sign(&self, message: &[u8]) -> Result<String, SignatureError> {
        let sig = self
            .key
            .sign(NAMESPACE, HashAlg::Sha512, message)
            .map_err(|e| SignatureError::Key(format!("signing: {e}")))?;
        sig.to_pem(LineEnding::LF)
            .map_err(|e| SignatureError::Key(format!("encoding the signature: {e}")))
    }
}

fn allowed_signers_line(key: &PublicKey, principal: &str) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let body = key.to_openssh().expect("an Ed25519 key always encodes");
    format!("{principal} namespaces=\"{NAMESPACE}\" {}", body.trim_end())
}

/// The keys whose image signatures are accepted, from an allowed-signers
/// file (`principals [options] keytype base64 [comment]`, as
/// `ssh-keygen -Y verify -f` reads) or bare public key lines. A line whose
/// `namespaces=` option does not include [`NAMESPACE`] is not used.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    keys: Vec<(String, PublicKey)>,
}

impl AllowedSigners {
    pub fn parse(text: &str) -> Result<AllowedSigners, SignatureError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |why: String| SignatureError::AllowedSigners(format!("line {}: {why}", n + 1));
            // A bare key, or principals and options before the key.
            let (principal, options, key_text) = match PublicKey::from_openssh(line) {
                Ok(_) => ("*".to_string(), String::new(), line.to_string()),
                Err(_) => {
                    let (principal, rest) = line
                        .split_once(char::is_whitespace)
                        .ok_or_else(|| bad("expected `principals [options] key`".into()))?;
                    let rest = rest.trim_start();
                    match PublicKey::from_openssh(rest) {
                        Ok(_) => (principal.to_string(), String::new(), rest.to_string()),
                        Err(_) => {
                            let (options, key) = split_options(rest)
                                .ok_or_else(|| bad("expected `principals [options] key`".into()))?;
                            (principal.to_string(), options, key.to_string())
                        }
                    }
                }
            };
            let key = PublicKey::from_openssh(&key_text)
                .map_err(|e| bad(format!("not a public key: {e}")))?;
            if key.algorithm() != ssh_key::Algorithm::Ed25519 {
                return Err(bad(format!(
                    "the key is {}, kiln image signatures are ssh-ed25519",
                    key.algorithm()
                )));
            }
            if !namespace_allowed(&options) {
                continue;
            }
            keys.push((principal, key));
        }
        Ok(AllowedSigners { keys })
    }

    pub fn load(path: &Path) -> Result<AllowedSigners, SignatureError> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ALLOWED_SIGNERS).read_to_string(&mut text))
            .map_err(|e| {
                SignatureError::AllowedSigners(format!("reading {}: {e}", path.display()))
            })?;
        AllowedSigners::parse(&text)
            .map_err(|e| SignatureError::AllowedSigners(format!("{}: {e}", path.display())))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Checks the armored `signature` of `message`; returns the signer's
    /// fingerprint.
    pub fn verify(&self, message: &[u8], signature: &str) -> Result<String, SignatureError> {
        let sig = SshSig::from_pem(signature.trim())
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        if sig.namespace() != NAMESPACE {
            return Err(SignatureError::Namespace {
                found: sig.namespace().chars().take(64).collect(),
            });
        }
        let signer = PublicKey::from(sig.public_key().clone());
        let fingerprint = signer.fingerprint(HashAlg::Sha256).to_string();
        let Some((_, key)) = self
            .keys
            .iter()
            .find(|(_, k)| k.key_data() == signer.key_data())
        else {
            return Err(SignatureError::UnknownSigner { key: fingerprint });
        };
        key.verify(NAMESPACE, message, &sig)
            .map_err(|_| SignatureError::Mismatch {
                key: fingerprint.clone(),
            })?;
        Ok(fingerprint)
    }
}

/// Splits `opt1,opt2="a b" keytype base64...` into options and key.
fn split_options(s: &str) -> Option<(String, &str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                return Some((s[..i].to_string(), s[i..].trim_start()))
            }
            _ => {}
        }
    }
    None
}

fn namespace_allowed(options: &str) -> bool {
    let mut quoted = false;
    let mut start = 0;
    let mut opts = Vec::new();
    for (i, c) in options.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                opts.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    opts.push(&options[start..]);
    for o in opts {
        if let Some(v) = o.strip_prefix("namespaces=") {
            let v = v.trim_matches('"');
            return v.split(',').any(|n| n == NAMESPACE || n == "*");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_refuses_changes() {
        let key = SigningKey::generate("test").unwrap();
        let sig = key.sign(b"manifest").unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----"));
        let signers = AllowedSigners::parse(&key.allowed_signers_line("kiln-master")).unwrap();
        assert_eq!(
            signers.verify(b"manifest", &sig).unwrap(),
            key.fingerprint()
        );
        assert!(matches!(
            signers.verify(b"manifesT", &sig),
            Err(SignatureError::Mismatch { .. })
        ));
        let other = SigningKey::generate("other").unwrap();
        let theirs = AllowedSigners::parse(&other.public_line()).unwrap();
        assert!(matches!(
            theirs.verify(b"manifest", &sig),
            Err(SignatureError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn a_line_for_another_namespace_is_not_used() {
        let key = SigningKey::generate("test").unwrap();
        let pubkey = key.public_line();
        let line = format!("kiln-master namespaces=\"git,file\" {pubkey}");
        let signers = AllowedSigners::parse(&line).unwrap();
        assert!(signers.is_empty());
        let sig = key.sign(b"m").unwrap();
        assert!(signers.verify(b"m", &sig).is_err());
    }

    #[test]
    fn a_key_round_trips_through_openssh_text() {
        let key = SigningKey::generate("c").unwrap();
        let again = SigningKey::parse(&key.to_openssh()).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
    }

    #[test]
    fn garbage_is_refused_with_the_line() {
        let e = AllowedSigners::parse("# c\n\nkiln-master ssh-ed25519 !!!\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
    }
}
