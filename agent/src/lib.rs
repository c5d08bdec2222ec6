//! kiln-agent's build engine: turns a blank disk into an installed,
//! configured system and captures it as a compressed block-level image.
//!
//! [`build::build`] runs every phase for one job; [`capture::capture`] and
//! [`verify::verify`] work on their own. Callers follow the work through
//! [`progress::Event`]s and stop it with an abort flag.

pub mod boot;
pub mod build;
pub mod capture;
pub mod chroot;
pub mod command;
pub mod compression;
pub mod configure;
pub mod deploy;
pub mod disk;
pub mod error;
pub mod generalize;
pub mod hardware;
pub mod initramfs;
pub mod joblog;
pub mod payload;
pub mod pid1;
pub mod progress;
pub mod run;
pub mod steps;
pub mod tree;
pub mod verify;

pub use build::{build, manifest_path_for, BuildRequest};
pub use error::{Error, Result};
pub use progress::{Event, EventKind, Phase};
