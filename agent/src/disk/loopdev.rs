//! Loop devices for disk image files, attached by ioctl (LOOP_CTL_GET_FREE,
//! LOOP_CONFIGURE, falling back to LOOP_SET_FD) with partition scanning on.
//! The guard detaches the device on drop.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

const LOOP_SET_FD: libc::c_ulong = 0x4c00;
const LOOP_CLR_FD: libc::c_ulong = 0x4c01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4c04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4c0a;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4c82;
const LO_FLAGS_PARTSCAN: u32 = 8;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device; detached (partitions dropped first) on drop.
pub struct LoopDevice {
    path: PathBuf,
    file: Option<File>,
}

impl LoopDevice {
    /// Attaches `backing` (a regular file) to a free loop device.
    pub fn attach(backing: &Path) -> Result<LoopDevice> {
        let backing_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .ctx(|| format!("opening {} for a loop device", backing.display()))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .ctx(|| "opening /dev/loop-control".to_string())?;
        let mut last_err = None;
        // Another process may take the free device between the two calls.
        for _ in 0..10 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(std::io::Error::last_os_error())
                    .ctx(|| "finding a free loop device".to_string());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .ctx(|| format!("opening {}", path.display()))?;
            match configure(&dev, &backing_file, backing) {
                Ok(()) => {
                    return Ok(LoopDevice {
                        path,
                        file: Some(dev),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                Err(e) => {
                    return Err(e)
                        .ctx(|| format!("attaching {} to {}", backing.display(), path.display()))
                }
            }
        }
        Err(Error::Io {
            what: format!("attaching {} to a loop device", backing.display()),
            source: last_err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches now, reporting failure (drop only logs it).
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let _ = file.sync_all();
        super::partition::drop_partitions(&file, &self.path);
        let mut last = None;
        for _ in 0..50 {
            // SAFETY: LOOP_CLR_FD takes no argument.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD as _, 0) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e).ctx(|| format!("detaching {}", self.path.display()));
            }
            last = Some(e);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(Error::Io {
            what: format!("detaching {}", self.path.display()),
            source: last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            eprintln!("kiln-agent: {}", e.one_line());
        }
    }
}

fn info_for(backing: &Path) -> LoopInfo64 {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: LO_FLAGS_PARTSCAN,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let name = backing.as_os_str().as_encoded_bytes();
    let n = name.len().min(63);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

fn configure(dev: &File, backing: &File, backing_path: &Path) -> std::io::Result<()> {
    let cfg = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: info_for(backing_path),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one loop_config struct.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(e);
    }
    // Kernels before 5.8 have no LOOP_CONFIGURE.
    // SAFETY: LOOP_SET_FD takes the backing file descriptor by value.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let info = info_for(backing_path);
    // SAFETY: LOOP_SET_STATUS64 reads one loop_info64 struct.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        return Err(e);
    }
    Ok(())
}
