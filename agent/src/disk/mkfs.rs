//! Filesystems with the only external tools the agent carries: mke2fs,
//! mkfs.vfat and mkswap. The agent picks each filesystem's UUID itself so
//! fstab can be written without reading them back.

use std::path::Path;
use std::process::Command;

use kiln_spool::job::FsKind;

use crate::command::run;
use crate::error::Result;
use crate::joblog::JobLog;

/// The identity a new filesystem got, in the form fstab and blkid use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsId {
    /// `UUID=` value: a UUID for ext4 and swap, `XXXX-XXXX` for vfat.
    pub uuid: String,
}

/// Makes the filesystem `fs` labelled `label` on `node`. Returns `None` for `fs = "none"`.
pub fn make_fs(node: &Path, fs: FsKind, label: &str, log: &JobLog) -> Result<Option<FsId>> {
    let id = uuid::Uuid::new_v4();
    match fs {
        FsKind::None => Ok(None),
        FsKind::Ext4 => {
            let uuid = id.hyphenated().to_string();
            run(
                Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4", "-L", label, "-U", &uuid])
                    .arg(node),
                log,
            )?;
            Ok(Some(FsId { uuid }))
        }
        FsKind::Vfat => {
            let b = id.as_bytes();
            let volid = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let hex = format!("{volid:08X}");
            run(
                Command::new("mkfs.vfat")
                    .args(["-n", label, "-i", &hex])
                    .arg(node),
                log,
            )?;
            Ok(Some(FsId {
                uuid: format!("{}-{}", &hex[..4], &hex[4..]),
            }))
        }
        FsKind::Swap => {
            let uuid = id.hyphenated().to_string();
            run(
                Command::new("mkswap")
                    .args(["-L", label, "-U", &uuid])
                    .arg(node),
                log,
            )?;
            Ok(Some(FsId { uuid }))
        }
    }
}
