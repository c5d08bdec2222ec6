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
    /// When the phase began (absent in manifests from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Timestamp>,
}

/// Longest text field of [`Hardware`], in bytes.
pub const MAX_HARDWARE_FIELD: usize = 256;
/// Most network interfaces in [`Hardware::nics`].
pub const MAX_NICS: usize = 64;

/// The build machine as the agent saw it. The agent says so; the master's
/// signature attests that this agent said it, not that it is true.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// DMI system vendor and product name (`/sys/class/dmi/id`).
    #[serde(default)]
    pub vendor: String,
    #[serde(default)]
    pub product: String,
    /// The CPU's model name and how many logical CPUs are online.
    #[serde(default)]
    pub cpu_model: String,
    #[serde(default)]
    pub cpus: u32,
    /// Memory, in bytes (`MemTotal`).
    #[serde(default)]
    pub memory_bytes: u64,
    /// The disk the image was built on: model and size in bytes.
    #[serde(default)]
    pub disk_model: String,
    #[serde(default)]
    pub disk_size: u64,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    pub mac: String,
}

/// How the image was made: what the agent reports of itself and the
/// machine, and what the master adds when it publishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The agent's kiln version.
    #[serde(default)]
    pub kiln_version: String,
    #[serde(default)]
    pub hardware: Hardware,
    /// Set by the master when it publishes: the job file's text, whose
    /// BLAKE3 is [`ImageManifest::job_blake3`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_text: String,
    /// Set by the master when it publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Timestamp>,
    /// Set by the master when it publishes: the master's kiln version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub publisher_version: String,
    /// Set by the master when it publishes: the fingerprint of the key
    /// that signs the manifest (`SHA256:...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
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
    /// How the image was made; see [`Provenance`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
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
