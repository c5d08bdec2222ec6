//! The verified deploy: writes a published image onto a disk, range by
//! range, and proves it arrived.
//!
//! 1. **Check**: the manifest's signature and shape ([`check_signed`]), the
//!    disk (a block device or file, not in use, large enough), and (with
//!    [`DeployOptions::precheck`]) one pass of the compressed image through
//!    BLAKE3, compared with the signed manifest before anything is written;
//!    an image that fails it is decompressed once more to name the range
//!    that differs.
//! 2. **Deploy**: the partition table is wiped, the bytes outside the data
//!    ranges are punched out (files) or discarded (block devices that
//!    support it; on others they keep their old contents), and the image is
//!    decompressed and written range by range, each range's BLAKE3 checked
//!    as it streams; the partition-table area is written last.
//! 3. **Readback**: after `fsync` the cache is dropped and every range is
//!    read back from the device and hashed.
//! 4. **Grow**: on a larger disk, the backup GPT moves to the end and the
//!    last partition and its ext4 filesystem grow to fill the disk.
//!
//! Any failure once the write began wipes the partition table (the
//! protective MBR, both GPTs, and the backup GPT where the image put it),
//! so a machine never boots a half-written or mismatched image.

mod check;
pub mod grow;
mod readback;
mod write;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use kiln_spool::manifest::{ImageManifest, PhaseTime};
use kiln_spool::time::Timestamp;
use kiln_spool::units::human_bytes;

pub use check::{check_shape, check_signed, load_signed, SignedImage, MAX_MANIFEST};
pub use grow::Grown;
pub use write::HELD_BACK;

use crate::error::{Context, Error, Result};
use crate::progress::{Event, EventKind, Phase};

/// Where the compressed image comes from; opened once for the pre-check
/// and once for the write (a local file, or SFTP in `kiln-agent run`).
pub trait ImageSource {
    fn open(&mut self) -> std::io::Result<Box<dyn Read + Send>>;
    /// What the source is, for messages: a path or a URL.
    fn describe(&self) -> String;
}

/// A compressed image in a local file.
pub struct FileSource(pub PathBuf);

impl ImageSource for FileSource {
    fn open(&mut self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(&self.0)?))
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// Grow the last partition and its filesystem to fill a larger disk.
    pub grow: bool,
    /// Read the whole compressed image once, against the signed size and
    /// BLAKE3, before writing anything: an image that does not match is
    /// refused with the disk untouched. Without it (a deploy job, which
    /// would otherwise fetch the image twice over the network) the image
    /// streams straight onto the disk, and a range that does not match
    /// stops the write with the partition table wiped.
    pub precheck: bool,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            grow: true,
            precheck: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeployResult {
    /// The target disk's size in bytes.
    pub disk_size: u64,
    /// Bytes written to the disk: the data ranges.
    pub bytes_written: u64,
    pub grown: bool,
    pub phases: Vec<PhaseTime>,
    /// What the grow did, or why it did nothing (`None` without `grow`).
    pub grow: Option<Grown>,
}

/// The disk being written: opened once, exclusively for a block device.
pub(crate) struct Target {
    pub file: File,
    pub path: PathBuf,
    pub block: bool,
    pub size: u64,
}

impl Target {
    fn open(disk: &Path, m: &ImageManifest) -> Result<Target> {
        let meta = std::fs::metadata(disk)
            .map_err(|e| Error::Input(format!("{}: cannot use as a disk: {e}", disk.display())))?;
        let ft = meta.file_type();
        let block = ft.is_block_device();
        if !block && !ft.is_file() {
            return Err(Error::Input(format!(
                "{} is neither a block device nor a regular file",
                disk.display()
            )));
        }
        crate::disk::check_not_in_use(disk)?;
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if block {
            // Refused while the kernel or another program holds the device.
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(disk).map_err(|e| {
            Error::Input(format!("{}: cannot open for writing: {e}", disk.display()))
        })?;
        let size = crate::disk::size_of(&file, disk)?;
        if size < m.disk_size {
            return Err(Error::Input(format!(
                "{} holds {} ({size} bytes), the image needs {} ({} bytes)",
                disk.display(),
                human_bytes(size),
                human_bytes(m.disk_size),
                m.disk_size
            )));
        }
        Ok(Target {
            file,
            path: disk.to_path_buf(),
            block,
            size,
        })
    }
}

struct PhaseClock {
    phase: Phase,
    started: Timestamp,
    t: Instant,
}

fn start(phase: Phase, events: &mut dyn FnMut(&Event)) -> PhaseClock {
    events(&Event {
        phase,
        kind: EventKind::Started,
    });
    PhaseClock {
        phase,
        started: Timestamp::now(),
        t: Instant::now(),
    }
}

fn finish(c: PhaseClock, events: &mut dyn FnMut(&Event), phases: &mut Vec<PhaseTime>) {
    let seconds = c.t.elapsed().as_secs_f64();
    events(&Event {
        phase: c.phase,
        kind: EventKind::Finished { seconds },
    });
    phases.push(PhaseTime {
        name: c.phase.as_str().to_string(),
        seconds,
        started: Some(c.started),
    });
}

fn message(phase: Phase, text: String, events: &mut dyn FnMut(&Event)) {
    events(&Event {
        phase,
        kind: EventKind::Message(text),
    });
}

/// Writes `image` from `source` onto `disk`, checks it, and grows it to
/// fill the disk when `opts.grow`. Bad input (a disk that does not fit, an
/// image that does not match the signed manifest before the write) is
/// [`Error::Input`] and leaves the disk untouched; a failure after the
/// write began leaves the partition table wiped.
pub fn deploy(
    image: &SignedImage,
    source: &mut dyn ImageSource,
    disk: &Path,
    opts: &DeployOptions,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<DeployResult> {
    let m = &image.manifest;
    check_shape(m).map_err(|e| Error::Input(format!("the manifest: {e}")))?;
    let mut phases = Vec::new();
    let clock = start(Phase::Check, events);
    let target = Target::open(disk, m)?;
    if opts.precheck {
        if let Err(e) = write::precheck(source, m, events, abort) {
            return Err(match (e, write::diagnose(source, m, abort)) {
                (Error::Input(why), Some(at)) => {
                    Error::Input(format!("{why}: {at}; nothing was written"))
                }
                (Error::Input(why), None) => Error::Input(format!("{why}; nothing was written")),
                (e, _) => e,
            });
        }
    }
    finish(clock, events, &mut phases);

    let mut current = Phase::Deploy;
    let r = write_and_check(
        image,
        source,
        target,
        opts,
        &mut current,
        events,
        abort,
        &mut phases,
    );
    match r {
        Ok(mut result) => {
            result.phases = phases;
            Ok(result)
        }
        Err(e) => {
            message(
                current,
                format!(
                    "failed: {}; wiping the partition table of {}",
                    e.one_line(),
                    disk.display()
                ),
                events,
            );
            if let Err(w) = wipe_after_failure(disk, m) {
                message(current, w.one_line(), events);
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_and_check(
    image: &SignedImage,
    source: &mut dyn ImageSource,
    target: Target,
    opts: &DeployOptions,
    current: &mut Phase,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
    phases: &mut Vec<PhaseTime>,
) -> Result<DeployResult> {
    let m = &image.manifest;
    let disk = target.path.clone();
    let clock = start(Phase::Deploy, events);
    crate::disk::partition::wipe_table(&disk)?;
    if let Some(note) = write::clear_gaps(&target, m)? {
        message(Phase::Deploy, note, events);
    }
    let bytes_written = write::write_image(source, m, &target, events, abort)?;
    crate::disk::sync_device(&target.file, &disk)?;
    finish(clock, events, phases);

    *current = Phase::Readback;
    let clock = start(Phase::Readback, events);
    readback::readback(&target, m, events, abort)?;
    finish(clock, events, phases);
    let disk_size = target.size;
    drop(target);

    let mut grown = None;
    if opts.grow {
        *current = Phase::Grow;
        let clock = start(Phase::Grow, events);
        let g = grow::grow(&disk, m.disk_size)?;
        let text = match &g {
            Grown::Partition { number, end, fs } => format!(
                "partition {number} now ends at byte {end} of {} ({}); {fs}",
                disk.display(),
                human_bytes(disk_size)
            ),
            Grown::Nothing(why) => why.clone(),
        };
        message(Phase::Grow, text, events);
        finish(clock, events, phases);
        grown = Some(g);
    }
    Ok(DeployResult {
        disk_size,
        bytes_written,
        grown: matches!(grown, Some(Grown::Partition { .. })),
        phases: Vec::new(),
        grow: grown,
    })
}

/// Wipes the partition table after a failed deploy: the protective MBR,
/// the primary GPT and the backup GPT at the disk's end, and the backup GPT
/// where the image put it, at the end of the image's disk.
pub fn wipe_after_failure(disk: &Path, m: &ImageManifest) -> Result<()> {
    crate::disk::partition::wipe_table(disk)?;
    let file = OpenOptions::new()
        .write(true)
        .open(disk)
        .ctx(|| format!("opening {} to wipe its partition table", disk.display()))?;
    let size = crate::disk::size_of(&file, disk)?;
    if size > m.disk_size {
        let len = (128 * 128 + 4096u64).min(m.disk_size);
        file.write_all_at(&vec![0u8; len as usize], m.disk_size - len)
            .and_then(|()| file.sync_all())
            .ctx(|| {
                format!(
                    "wiping the image's backup GPT at byte {} of {}",
                    m.disk_size - len,
                    disk.display()
                )
            })?;
    }
    Ok(())
}
