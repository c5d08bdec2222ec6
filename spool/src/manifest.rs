//! The image manifest: what the agent captured and how to check it.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// Most lines in [`ImageManifest::generalized`].
pub const MAX_GENERALIZED: usize = 256;
/// Longest line in [`ImageManifest::generalized`], in bytes.
pub const MAX_GENERALIZED_LINE: usize = 512;

/// A run of the disk that holds data. Everything outside the ranges reads
/// back as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRange {
    pub offset: u64,
    pub length: u64,
    /// BLAKE3 of the range's bytes.
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadHash {
    pub name: String,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseTime {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// Always `raw.zst`: a zstd stream that decompresses to the raw disk.
    pub format: String,
    pub job: String,
    /// BLAKE3 of the job file the image was built from (empty for `capture`).
    #[serde(default)]
    pub job_blake3: String,
    #[serde(default)]
    pub agent: String,
    pub disk_size: u64,
    pub block_size: u64,
    /// Bytes read from the disk during capture.
    pub bytes_read: u64,
    /// Size and BLAKE3 of the compressed image file.
    pub image_size: u64,
    pub image_blake3: String,
    #[serde(default)]
    pub payloads: Vec<PayloadHash>,
    pub started: Timestamp,
    pub finished: Timestamp,
    #[serde(default)]
    pub phases: Vec<PhaseTime>,
    #[serde(default)]
    pub ranges: Vec<DataRange>,
    /// What `[image] generalize` removed from the image, one line each (a
    /// path, or a directory and how many entries): at most
    /// [`MAX_GENERALIZED`] lines of [`MAX_GENERALIZED_LINE`] bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generalized: Vec<String>,
}

impl ImageManifest {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serializes")
    }

    /// Bytes of the disk inside data ranges.
    pub fn data_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }
}
