//! The layout of an upload in `incoming/<job>/<token>/`.
//!
//! ```text
//! chunk-00000000 ...   the compressed image cut in `chunk_size` pieces;
//!                      each appears under its final name only when whole
//! chunks.toml          the chunk list with a BLAKE3 for each
//! job.log              the agent's job log (optional)
//! manifest.toml        the image manifest: written last, marks the upload complete
//! ```

use serde::{Deserialize, Serialize};

pub const CHUNKS: &str = "chunks.toml";
pub const MANIFEST: &str = "manifest.toml";
pub const JOB_LOG: &str = "job.log";
pub const IMAGE_FILE: &str = "image.raw.zst";
/// Written by the master beside a published image.
pub const PUBLISHED: &str = "published.toml";
/// The master's SSH signature of a published image's `manifest.toml`
/// (namespace [`crate::signature::NAMESPACE`]).
pub const SIGNATURE: &str = "manifest.toml.sig";
/// Written by an agent that finished a deploy job, in place of an upload:
/// which image went onto which machine. Marks the deploy complete.
pub const DEPLOYED: &str = "deployed.toml";

pub fn chunk_name(index: usize) -> String {
    format!("chunk-{index:08}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    pub chunk_size: u64,
    pub total_size: u64,
    #[serde(default, rename = "chunk")]
    pub chunks: Vec<Chunk>,
}

impl ChunkList {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a chunk list always serializes")
    }

    /// Checks that the sizes add up: every chunk but the last is `chunk_size`.
    pub fn check_shape(&self) -> Result<(), String> {
        if self.chunk_size == 0 {
            return Err("chunk_size is 0".into());
        }
        let n = self.chunks.len();
        for (i, c) in self.chunks.iter().enumerate() {
            if (i + 1 < n && c.size != self.chunk_size) || c.size == 0 || c.size > self.chunk_size {
                return Err(format!(
                    "chunk {i} has size {}, chunk_size is {}",
                    c.size, self.chunk_size
                ));
            }
        }
        let sum: u64 = self.chunks.iter().map(|c| c.size).sum();
        if sum != self.total_size {
            return Err(format!(
                "chunks add up to {sum} bytes, total_size is {}",
                self.total_size
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    pub job: String,
    pub token: String,
    pub agent: String,
    pub published: crate::time::Timestamp,
    pub image_size: u64,
    pub image_blake3: String,
    pub disk_size: u64,
}

impl Published {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a publish record always serializes")
    }
}

/// What an agent reports when it has deployed an image (`deployed.toml`
/// in its upload directory). Agent-written: the master reads it through
/// [`crate::untrusted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployReport {
    /// The deploy job.
    pub job: String,
    /// The published image written (its id under `images/`).
    pub image: String,
    /// BLAKE3 of the image's signed manifest: which publication it was.
    pub manifest_blake3: String,
    /// BLAKE3 of the compressed image.
    pub image_blake3: String,
    pub agent: String,
    /// The disk written, its size in bytes, and whether the last partition
    /// was grown to fill it.
    pub disk: String,
    pub disk_size: u64,
    #[serde(default)]
    pub grown: bool,
    /// Bytes written (the image's data ranges).
    pub bytes_written: u64,
    pub started: crate::time::Timestamp,
    pub finished: crate::time::Timestamp,
    #[serde(default)]
    pub phases: Vec<crate::manifest::PhaseTime>,
    #[serde(default)]
    pub hardware: crate::manifest::Hardware,
}

impl DeployReport {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a deploy report always serializes")
    }
}
