//! `initramfs.toml`: what goes into the initramfs. Every field is optional in
//! the file; command-line flags fill or override them. Relative paths are
//! relative to the config file's directory.
//!
//! ```toml
//! agent = "../target/x86_64-unknown-linux-musl/release/kiln-agent"  # becomes /init
//! agent_config = "agent.toml"          # becomes /etc/kiln/agent.toml
//! kernel_modules = "../.cache/kernel"  # lib/modules/<ver>, or a root holding it
//! compress = "zstd"                    # or "gzip"
//! modules = ["virtio_pci", "ext4"]     # replaces the default list
//! extra_modules = ["virtio_rng"]       # added to it
//! tools = ["mke2fs", "mkfs.vfat"]      # replaces the default list
//! busybox = "/bin/busybox"
//! [[files]]
//! src = "motd"
//! dest = "/etc/motd"
//! mode = 0o644
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How the cpio is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Self::Zstd),
            "gzip" => Ok(Self::Gzip),
            other => Err(format!("unknown compression {other:?} (zstd or gzip)")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
        })
    }
}

/// An extra file copied into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    pub src: PathBuf,
    pub dest: String,
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

fn default_file_mode() -> u32 {
    0o644
}

/// The config file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: Option<PathBuf>,
    pub agent_config: Option<PathBuf>,
    pub kernel_modules: Option<PathBuf>,
    pub compress: Option<Compression>,
    pub modules: Option<Vec<String>>,
    #[serde(default)]
    pub extra_modules: Vec<String>,
    pub tools: Option<Vec<String>>,
    pub busybox: Option<PathBuf>,
    #[serde(default)]
    pub files: Vec<ExtraFile>,
}

/// Why a config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Parse { path: PathBuf, problem: String },
    #[error("{0}")]
    Missing(String),
}

/// Drivers and filesystems the agent may need on a build machine, by module
/// name; their dependencies and soft dependencies come along.
pub const DEFAULT_MODULES: &[&str] = &[
    // disks
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "nvme",
    "ahci",
    "sd_mod",
    // network
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    // filesystems and the code pages vfat mounts with
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
];

/// Tools copied with their shared libraries, by name (searched in the usual
/// sbin and bin directories) or absolute path.
pub const DEFAULT_TOOLS: &[&str] = &["mke2fs", "mkfs.vfat", "mkswap", "e2fsck", "resize2fs"];

impl Config {
    /// Parses a config; `base` is the directory relative paths start from.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: file.to_owned(),
            problem: e.to_string().trim_end().to_owned(),
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.agent);
        rebase(&mut config.agent_config);
        rebase(&mut config.kernel_modules);
        rebase(&mut config.busybox);
        for f in &mut config.files {
            f.src = base.join(&f.src);
        }
        if let Some(tools) = &mut config.tools {
            for t in tools {
                if t.contains('/') && !t.starts_with('/') {
                    *t = base.join(&*t).to_string_lossy().into_owned();
                }
            }
        }
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Resolves defaults and checks required fields.
    pub fn into_spec(self) -> Result<Spec, ConfigError> {
        let agent = self.agent.ok_or_else(|| {
            ConfigError::Missing("no agent given (`agent` in the config or --agent)".into())
        })?;
        let kernel_modules = self.kernel_modules.ok_or_else(|| {
            ConfigError::Missing(
                "no kernel modules given (`kernel_modules` in the config or --kernel-modules)"
                    .into(),
            )
        })?;
        let mut modules: Vec<String> = self
            .modules
            .unwrap_or_else(|| DEFAULT_MODULES.iter().map(|m| m.to_string()).collect());
        modules.extend(self.extra_modules);
        Ok(Spec {
            agent,
            agent_config: self.agent_config,
            kernel_modules,
            compress: self.compress.unwrap_or_default(),
            modules,
            tools: self
                .tools
                .unwrap_or_else(|| DEFAULT_TOOLS.iter().map(|t| t.to_string()).collect()),
            busybox: self
                .busybox
                .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
            files: self.files,
        })
    }
}

/// A complete description of an initramfs, ready to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Installed as `/init`.
    pub agent: PathBuf,
    /// Installed as `/etc/kiln/agent.toml`, mode 0600.
    pub agent_config: Option<PathBuf>,
    pub kernel_modules: PathBuf,
    pub compress: Compression,
    pub modules: Vec<String>,
    pub tools: Vec<String>,
    /// A static busybox.
    pub busybox: PathBuf,
    pub files: Vec<ExtraFile>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_config_file() {
        let text = r#"
agent = "bin/agent"
kernel_modules = "/abs/modules"
compress = "gzip"
extra_modules = ["virtio_rng"]
tools = ["mke2fs", "tools/mine"]
[[files]]
src = "motd"
dest = "/etc/motd"
"#;
        let c = Config::parse(text, Path::new("/etc/kiln/initramfs.toml")).unwrap();
        let spec = c.into_spec().unwrap();
        assert_eq!(spec.agent, PathBuf::from("/etc/kiln/bin/agent"));
        assert_eq!(spec.kernel_modules, PathBuf::from("/abs/modules"));
        assert_eq!(spec.compress, Compression::Gzip);
        assert_eq!(spec.modules.len(), DEFAULT_MODULES.len() + 1);
        assert_eq!(spec.tools, ["mke2fs", "/etc/kiln/tools/mine"]);
        assert_eq!(spec.files[0].src, PathBuf::from("/etc/kiln/motd"));
        assert_eq!(spec.files[0].mode, 0o644);
        assert_eq!(spec.busybox, PathBuf::from("/bin/busybox"));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_file() {
        let err = Config::parse("agnet = \"x\"\n", Path::new("i.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("i.toml: "), "{msg}");
        assert!(msg.contains("agnet"), "{msg}");
        let err = Config::parse("compress = \"lz4\"\n", Path::new("i.toml")).unwrap_err();
        assert!(err.to_string().contains("lz4"), "{err}");
    }

    #[test]
    fn agent_and_modules_are_required() {
        let err = Config::default().into_spec().unwrap_err();
        assert!(err.to_string().contains("--agent"), "{err}");
    }
}
