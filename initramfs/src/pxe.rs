//! The iPXE boot script and the directory a TFTP or HTTP server serves for
//! PXE: `boot.ipxe`, `vmlinuz` and `initramfs.img`.

use std::path::{Path, PathBuf};

/// File names inside a PXE directory.
pub const BOOT_SCRIPT: &str = "boot.ipxe";
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.img";

/// The kernel command line used when none is given: serial and VGA consoles,
/// the serial one last so it is `/dev/console`.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200 panic=10";

/// The text of an iPXE script that boots `kernel` with `initrd` and
/// `cmdline`. Paths are relative to where iPXE loaded the script from.
pub fn boot_ipxe(kernel: &str, initrd: &str, cmdline: &str) -> String {
    let cmdline = cmdline.trim();
    let sep = if cmdline.is_empty() { "" } else { " " };
    format!("#!ipxe\nkernel {kernel}{sep}{cmdline}\ninitrd {initrd}\nboot\n")
}

/// Writes `boot.ipxe` and copies the kernel and the initramfs into `dir`
/// (created if missing). Returns the script's path.
pub fn write_dir(
    dir: &Path,
    vmlinuz: &Path,
    initramfs: &Path,
    cmdline: &str,
) -> Result<PathBuf, PxeError> {
    let io = |what: String| move |source| PxeError { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    for (src, name) in [(vmlinuz, KERNEL), (initramfs, INITRAMFS)] {
        let dest = dir.join(name);
        std::fs::copy(src, &dest).map_err(io(format!(
            "copying {} to {}",
            src.display(),
            dest.display()
        )))?;
    }
    let script = dir.join(BOOT_SCRIPT);
    std::fs::write(&script, boot_ipxe(KERNEL, INITRAMFS, cmdline))
        .map_err(io(format!("writing {}", script.display())))?;
    Ok(script)
}

/// An I/O failure while writing a PXE directory.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct PxeError {
    what: String,
    #[source]
    source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_boots_kernel_with_initrd() {
        assert_eq!(
            boot_ipxe("vmlinuz", "initramfs.img", "console=ttyS0 kiln.debug=1\n"),
            "#!ipxe\nkernel vmlinuz console=ttyS0 kiln.debug=1\ninitrd initramfs.img\nboot\n"
        );
        assert_eq!(
            boot_ipxe("k", "i", ""),
            "#!ipxe\nkernel k\ninitrd i\nboot\n"
        );
    }

    #[test]
    fn write_dir_holds_the_three_files() {
        let tmp = tempfile::tempdir().unwrap();
        let k = tmp.path().join("k");
        let i = tmp.path().join("i");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let out = tmp.path().join("pxe");
        let script = write_dir(&out, &k, &i, DEFAULT_CMDLINE).unwrap();
        assert_eq!(std::fs::read(out.join(KERNEL)).unwrap(), b"kernel");
        assert_eq!(std::fs::read(out.join(INITRAMFS)).unwrap(), b"initrd");
        let text = std::fs::read_to_string(script).unwrap();
        assert!(
            text.starts_with("#!ipxe\nkernel vmlinuz console=tty0"),
            "{text}"
        );
    }
}
