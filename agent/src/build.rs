//! One build, every phase: check, partition, mkfs, mount, payloads,
//! configure, steps, unmount, capture. The entry point for the CLI's
//! `build` and for `kiln-agent run` on a leased job.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use kiln_spool::job::{FsKind, JobSpec};
use kiln_spool::manifest::{ImageManifest, PayloadHash, PhaseTime, Provenance};
use kiln_spool::time::Timestamp;

use crate::boot;
use crate::capture::{capture_to, CaptureOptions, FileSink, ImageSink};
use crate::chroot::{Target, TargetDisk};
use crate::configure::{configure, mount_depth, FsEntry};
use crate::disk::loopdev::LoopDevice;
use crate::disk::mkfs::{make_fs, FsId};
use crate::disk::mount::Mount;
use crate::disk::partition::{expose_partitions, wipe_table, write_table};
use crate::disk::plan::{plan, DiskPlan};
use crate::error::{check_abort, Context, Error, Result};
use crate::generalize::{generalize, manifest_lines};
use crate::initramfs;
use crate::joblog::JobLog;
use crate::payload::{apply_payloads, PayloadSource};
use crate::progress::{Event, EventKind, Phase};
use crate::steps::run_step;
use crate::tree::Tree;

/// Everything one build needs.
pub struct BuildRequest<'a> {
    pub job: &'a JobSpec,
    /// The job file's text, hashed into the manifest.
    pub job_text: &'a str,
    /// Where the payloads are streamed from.
    pub payloads: &'a dyn PayloadSource,
    /// A block device, or a disk image file (attached to a loop device).
    pub disk: &'a Path,
    /// The image to write (`NAME.raw.zst`); the manifest goes to
    /// [`manifest_path_for`] of it.
    pub out: &'a Path,
    pub log: &'a JobLog,
    /// Recorded in the manifest.
    pub agent_id: &'a str,
    /// A directory for the private mount point of the target.
    pub work_dir: &'a Path,
}

/// `IMAGE.raw.zst` -> `IMAGE.manifest.toml`.
pub fn manifest_path_for(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    let stem = name
        .strip_suffix(".raw.zst")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(&name);
    image.with_file_name(format!("{stem}.manifest.toml"))
}

/// A build that failed, and the phase it failed in (not the clean-up
/// that ran after it).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BuildError {
    pub phase: Phase,
    #[source]
    pub error: Error,
}

impl BuildError {
    pub fn is_input(&self) -> bool {
        self.error.is_input()
    }

    pub fn one_line(&self) -> String {
        self.error.one_line()
    }
}

struct Phases<'e> {
    events: &'e mut dyn FnMut(&Event),
    times: Vec<PhaseTime>,
    log: JobLog,
    /// The phase that runs, or ran last.
    current: Phase,
    /// The first phase that failed.
    failed: Option<Phase>,
}

impl Phases<'_> {
    fn run<T>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&mut dyn FnMut(&Event)) -> Result<T>,
    ) -> Result<T> {
        self.log.line(&format!("== {phase}"));
        self.current = phase;
        (self.events)(&Event {
            phase,
            kind: EventKind::Started,
        });
        let started = Timestamp::now();
        let t = Instant::now();
        let r = f(&mut *self.events);
        let seconds = t.elapsed().as_secs_f64();
        if r.is_err() {
            self.failed.get_or_insert(phase);
        }
        if r.is_ok() {
            (self.events)(&Event {
                phase,
                kind: EventKind::Finished { seconds },
            });
            self.times.push(phase_time(phase, started, seconds));
        }
        r
    }
}

/// Builds the job on the disk and captures it. Writes the image and its
/// manifest, and returns the manifest. Bad input (`Error::Input`) is found
/// before the disk is touched; any failure after partitioning started is
/// logged and leaves the disk with its partition table wiped.
pub fn build(
    req: &BuildRequest,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<ImageManifest, BuildError> {
    let manifest = build_into(req, &mut FileSink::new(req.out), 0, events, abort)?;
    write_manifest(req.out, &manifest).map_err(|error| BuildError {
        phase: Phase::Capture,
        error,
    })?;
    Ok(manifest)
}

/// [`build`] with the image captured into `sink` (with `workers` zstd
/// workers, 0 for the CPUs) instead of `req.out`, and no manifest file:
/// the manifest is returned once the sink is finished.
pub fn build_into(
    req: &BuildRequest,
    sink: &mut dyn ImageSink,
    workers: u32,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<ImageManifest, BuildError> {
    let started = Timestamp::now();
    let log = req.log.clone();
    log.line(&format!(
        "build of job {} on {}",
        req.job.id,
        req.disk.display()
    ));
    let mut phases = Phases {
        events,
        times: Vec::new(),
        log: log.clone(),
        current: Phase::Check,
        failed: None,
    };
    let r = build_phases(req, &mut phases, sink, workers, abort, started);
    if let Err(e) = &r {
        log.line(&format!("build failed: {}", e.one_line()));
    }
    log.sync();
    r.map_err(|error| BuildError {
        phase: phases.failed.unwrap_or(phases.current),
        error,
    })
}

fn build_phases(
    req: &BuildRequest,
    phases: &mut Phases,
    sink: &mut dyn ImageSink,
    workers: u32,
    abort: &AtomicBool,
    started: Timestamp,
) -> Result<ImageManifest> {
    let job = req.job;
    let (payload_sizes, disk_plan) = phases.run(Phase::Check, |_| {
        let sizes = req.payloads.check(&job.payloads)?;
        let meta = std::fs::metadata(req.disk)
            .map_err(|e| Error::Input(format!("disk {}: {e}", req.disk.display())))?;
        let (size, sector) = if meta.file_type().is_block_device() {
            crate::disk::check_not_in_use(req.disk)?;
            let f =
                std::fs::File::open(req.disk).ctx(|| format!("opening {}", req.disk.display()))?;
            (
                crate::disk::size_of(&f, req.disk)?,
                crate::disk::sector_size(&f),
            )
        } else if meta.is_file() {
            (meta.len(), 512)
        } else {
            return Err(Error::Input(format!(
                "disk {} is neither a block device nor a file",
                req.disk.display()
            )));
        };
        let p = plan(&job.disk, size, sector)
            .map_err(|e| Error::Input(format!("disk {}: {e}", req.disk.display())))?;
        Ok((sizes, p))
    })?;
    check_abort(abort)?;

    let loopdev = if std::fs::metadata(req.disk).is_ok_and(|m| m.is_file()) {
        Some(LoopDevice::attach(req.disk)?)
    } else {
        None
    };
    let dev = loopdev
        .as_ref()
        .map_or(req.disk, |l| l.path())
        .to_path_buf();
    if let Some(l) = &loopdev {
        req.log.line(&format!(
            "{} attached to {}",
            req.disk.display(),
            l.path().display()
        ));
    }

    let r = destructive(req, phases, abort, &dev, &disk_plan, &payload_sizes);
    if let Err(e) = &r {
        req.log.line(&format!("failed: {}", e.one_line()));
        match wipe_table(&dev) {
            Ok(()) => req
                .log
                .line(&format!("wiped the partition table of {}", dev.display())),
            Err(w) => req.log.line(&format!(
                "could not wipe the partition table: {}",
                w.one_line()
            )),
        }
    }
    let (payloads, generalized) = r?;
    drop(loopdev);

    let capture_opts = CaptureOptions {
        level: job.image.compression_level,
        threads: workers,
    };
    // The loop device is detached; an image file is captured as a file.
    let cap_src = req.disk.to_path_buf();
    let cap = phases.run(Phase::Capture, |ev| {
        capture_to(&cap_src, sink, &capture_opts, ev, abort)
    })?;
    for n in &cap.notes {
        req.log.line(&format!("capture: {n}"));
    }
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: job.id.clone(),
        job_blake3: blake3::hash(req.job_text.as_bytes()).to_hex().to_string(),
        agent: req.agent_id.to_string(),
        disk_size: cap.disk_size,
        block_size: cap.block_size,
        bytes_read: cap.bytes_read,
        image_size: cap.image_size,
        image_blake3: cap.image_blake3,
        payloads,
        started,
        finished: Timestamp::now(),
        phases: phases.times.clone(),
        ranges: cap.ranges,
        generalized,
        provenance: Some(provenance(req.disk)),
    };
    Ok(manifest)
}

/// A phase's entry in the manifest: when it began and how long it took,
/// to the millisecond.
pub fn phase_time(phase: Phase, started: Timestamp, seconds: f64) -> PhaseTime {
    PhaseTime {
        name: phase.as_str().into(),
        seconds: (seconds * 1000.0).round() / 1000.0,
        started: Some(started),
    }
}

/// What the agent says of itself and the machine that built on `disk`. The
/// job's text, the publication and the signer are the master's to add.
pub fn provenance(disk: &Path) -> Provenance {
    Provenance {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        hardware: crate::hardware::summary(disk),
        ..Provenance::default()
    }
}

/// Writes `manifest` beside `image`, atomically.
pub fn write_manifest(image: &Path, manifest: &ImageManifest) -> Result<PathBuf> {
    let path = manifest_path_for(image);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, manifest.to_toml()).ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).ctx(|| format!("renaming {} into place", tmp.display()))?;
    Ok(path)
}

/// The phases that change the disk, from partitioning to the final
/// unmount. Returns the hash of each payload as it was streamed, and what
/// generalizing removed.
fn destructive(
    req: &BuildRequest,
    phases: &mut Phases,
    abort: &AtomicBool,
    dev: &Path,
    disk_plan: &DiskPlan,
    payload_sizes: &[u64],
) -> Result<(Vec<PayloadHash>, Vec<String>)> {
    let job = req.job;
    let log = req.log;
    let nodes = phases.run(Phase::Partition, |_| {
        write_table(dev, disk_plan)?;
        log.line(&format!(
            "wrote a {:?} table with {} partitions",
            disk_plan.table,
            disk_plan.partitions.len()
        ));
        expose_partitions(dev, disk_plan, log)
    })?;
    check_abort(abort)?;
    let ids: Vec<Option<FsId>> = phases.run(Phase::Mkfs, |ev| {
        let mut ids = Vec::new();
        for (i, (p, node)) in disk_plan.partitions.iter().zip(&nodes).enumerate() {
            check_abort(abort)?;
            ids.push(make_fs(node, p.fs, &p.label, log)?);
            ev(&Event {
                phase: Phase::Mkfs,
                kind: EventKind::Progress {
                    done: i as u64 + 1,
                    total: nodes.len() as u64,
                },
            });
        }
        Ok(ids)
    })?;
    let fs_entries: Vec<FsEntry> = disk_plan
        .partitions
        .iter()
        .zip(&ids)
        .filter_map(|(part, id)| id.as_ref().map(|id| FsEntry { part, id }))
        .collect();

    let root_dir = req
        .work_dir
        .join(format!("kiln-target-{}-{}", job.id, std::process::id()));
    std::fs::create_dir_all(&root_dir).ctx(|| format!("creating {}", root_dir.display()))?;
    std::fs::set_permissions(&root_dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("restricting {}", root_dir.display()))?;
    let mut mounted: Vec<Mount> = Vec::new();
    let result = (|| -> Result<(Vec<PayloadHash>, Vec<String>)> {
        phases.run(Phase::Mount, |_| {
            let mut order: Vec<(usize, &str)> = disk_plan
                .partitions
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.mount.as_deref().map(|m| (i, m)))
                .collect();
            order.sort_by_key(|(_, m)| mount_depth(m));
            for (i, m) in order {
                let rel = Path::new(m.trim_start_matches('/'));
                if !rel.as_os_str().is_empty() {
                    let tree =
                        Tree::open(&root_dir).ctx(|| format!("opening {}", root_dir.display()))?;
                    tree.dir(rel)
                        .map_err(|e| Error::Failed(format!("making mount point {m}: {e}")))?;
                }
                let fstype = match disk_plan.partitions[i].fs {
                    FsKind::Vfat => "vfat",
                    _ => "ext4",
                };
                mounted.push(Mount::new(&nodes[i], &root_dir.join(rel), fstype)?);
            }
            Ok(())
        })?;
        let hashes = phases.run(Phase::Payloads, |ev| {
            apply_payloads(
                req.payloads,
                &job.payloads,
                payload_sizes,
                &root_dir,
                log,
                ev,
                abort,
            )
        })?;
        check_abort(abort)?;
        let mut target = Target::new(
            &root_dir,
            TargetDisk::new(dev, disk_plan, &nodes, &ids, log),
        );
        phases.run(Phase::Configure, |_| {
            let tree = target.tree()?;
            let initramfs_before = initramfs::Inputs::read(&tree);
            let days = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 86400);
            configure(&tree, &job.configure, &fs_entries, &job.id, days)?;
            if let Some(boot) = &job.boot {
                boot::check_loader(&tree, boot.firmware)?;
            }
            initramfs::refresh_if_needed(&mut target, &initramfs_before, &job.id, log, abort)?;
            if let Some(boot) = &job.boot {
                boot::install_loader(boot, &mut target, &job.id, log, abort)?;
            }
            Ok(())
        })?;
        let generalized = phases.run(Phase::Steps, |ev| {
            let env = target.disk().step_env();
            for (i, s) in job.steps.iter().enumerate() {
                check_abort(abort)?;
                ev(&Event {
                    phase: Phase::Steps,
                    kind: EventKind::Message(format!("{} ({}/{})", s.name, i + 1, job.steps.len())),
                });
                if s.place == kiln_spool::job::StepPlace::Target {
                    target.enter(log)?;
                }
                run_step(s, &root_dir, target.entered(), &env, &job.id, log, abort)?;
            }
            target.leave()?;
            if !job.image.generalize {
                return Ok(Vec::new());
            }
            let tree = target.tree()?;
            Ok(manifest_lines(generalize(&tree, log)?))
        })?;
        Ok((hashes, generalized))
    })();
    let unmounted = phases.run(Phase::Unmount, |_| {
        let mut first_err = None;
        while let Some(m) = mounted.pop() {
            if let Err(e) = m.unmount() {
                first_err.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_dir(&root_dir);
        let f = std::fs::File::open(dev).ctx(|| format!("opening {}", dev.display()))?;
        crate::disk::sync_device(&f, dev)?;
        first_err.map_or(Ok(()), Err)
    });
    let hashes = result?;
    unmounted?;
    Ok(hashes)
}
