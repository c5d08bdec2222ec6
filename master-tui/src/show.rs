//! `kiln-master show` of a publication or a deploy, `signer` and `verify`.

use std::path::Path;

use anyhow::Context;
use kiln_spool::master::deploy::deployments_of;
use kiln_spool::master::provenance::{
    master_signers, read_image, verify_image, ImageRecord, SignatureCheck,
};
use kiln_spool::master::signing::load_key;
use kiln_spool::master::{read_history, HistoryRecord, MasterError};
use kiln_spool::signature::AllowedSigners;
use kiln_spool::spool::{image_dir, SIGNING_KEY};
use kiln_spool::upload::DeployReport;
use kiln_spool::LocalSpool;

use crate::provenance::{format_image, image_json};

/// A published image with its signature checked now against the master's
/// key, and the deploy jobs that wrote it.
pub struct ShownImage {
    pub record: ImageRecord,
    pub check: SignatureCheck,
    pub deployments: Vec<HistoryRecord>,
}

impl ShownImage {
    pub fn text(&self) -> String {
        format_image(&self.record, &self.check, &self.deployments)
    }

    pub fn json(&self) -> serde_json::Value {
        image_json(&self.record, &self.check, &self.deployments)
    }
}

/// The published image `id`, if there is one.
pub fn image(spool: &LocalSpool, id: &str) -> Result<Option<ShownImage>, MasterError> {
    let Some(record) = read_image(spool, id)? else {
        return Ok(None);
    };
    let check = match master_signers(spool) {
        Ok(signers) => record.check_signature(&signers),
        Err(e) => SignatureCheck::Unchecked(e.to_string()),
    };
    let deployments = deployments_of(spool, id)?;
    Ok(Some(ShownImage {
        record,
        check,
        deployments,
    }))
}

/// What deploy job `id` reported, once it is done.
pub fn deployment(spool: &LocalSpool, id: &str) -> Result<Option<DeployReport>, MasterError> {
    Ok(read_history(spool)?
        .into_iter()
        .find(|h| h.entry.id == id)
        .and_then(|h| h.deployment))
}

/// The allowed-signers line of the master's key under `principal`.
pub fn signer_line(spool: &LocalSpool, principal: &str) -> anyhow::Result<String> {
    if principal.is_empty() || principal.contains([' ', '\t', '\n', ',', '"']) {
        return Err(MasterError::BadInput(format!(
            "--principal {principal:?}: a principal is one word without commas or quotes"
        ))
        .into());
    }
    let key = load_key(spool)?.ok_or_else(|| {
        MasterError::SigningKey(format!(
            "{SIGNING_KEY} is missing: `kiln-master --spool {} init` makes the signing key",
            spool.root().display()
        ))
    })?;
    Ok(key.allowed_signers_line(principal))
}

/// Checks image `id` and prints what holds; an error says what does not.
pub fn verify(spool: &LocalSpool, id: &str, signers: Option<&Path>) -> anyhow::Result<()> {
    let (signers, whose) = match signers {
        Some(path) => {
            let s = AllowedSigners::load(path)
                .map_err(|e| MasterError::BadInput(format!("--signers: {e}")))?;
            if s.is_empty() {
                return Err(MasterError::BadInput(format!(
                    "--signers: {} holds no key for namespace {:?}",
                    path.display(),
                    kiln_spool::signature::NAMESPACE
                ))
                .into());
            }
            (s, format!("a signer in {}", path.display()))
        }
        None => (master_signers(spool)?, "the master's key".to_string()),
    };
    let verified = verify_image(spool, id, &signers)?
        .map_err(|why| anyhow::anyhow!("{}: refused: {why}", image_dir(id)))
        .with_context(|| format!("verifying {id}"))?;
    println!(
        "{}: the signature verifies with {whose} ({})",
        image_dir(id),
        verified.signer
    );
    println!(
        "{}: manifest BLAKE3 {}; image {} bytes, BLAKE3 {}: ok",
        image_dir(id),
        verified.manifest_blake3,
        verified.image_size,
        verified.image_blake3
    );
    Ok(())
}
