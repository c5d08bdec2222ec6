//! kiln-initramfs: packs kiln's minimal OS into a reproducible newc cpio:
//! the agent as `/init`, the kernel modules for disks, NICs and filesystems
//! with their index files, mkfs tools with their libraries, busybox and the
//! agent config. Also writes the iPXE script and PXE directory.

pub mod config;
pub mod cpio;
pub mod elf;
pub mod modules;
pub mod pack;
pub mod pxe;

pub use config::{Compression, Config, Spec};
pub use pack::{build, compress, write_image, Report};
