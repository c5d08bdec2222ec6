//! PXE directories for VMs: `boot.ipxe`, `vmlinuz` and `initramfs.img`, as
//! `kiln-master pxe` writes them, served by QEMU's TFTP.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub use kiln_initramfs::pxe::{boot_ipxe, BOOT_SCRIPT, DEFAULT_CMDLINE, INITRAMFS, KERNEL};

/// Fills `dir` with the boot script, the kernel and the initramfs; returns
/// `dir` for [`crate::qemu::Qemu::pxe`] with [`BOOT_SCRIPT`].
pub fn pxe_dir(dir: &Path, vmlinuz: &Path, initramfs: &Path, cmdline: &str) -> Result<PathBuf> {
    kiln_initramfs::pxe::write_dir(dir, vmlinuz, initramfs, cmdline)
        .with_context(|| format!("writing the PXE directory {}", dir.display()))?;
    Ok(dir.to_owned())
}
