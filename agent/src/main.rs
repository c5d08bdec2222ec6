//! kiln-agent: builds images on a machine's disk.
//!
//! Exit status: 0 done, 1 failed, 2 bad input (job, payloads, disk, arguments).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use kiln_agent::capture::{capture, CaptureOptions};
use kiln_agent::joblog::JobLog;
use kiln_agent::payload::PayloadDir;
use kiln_agent::progress::Reporter;
use kiln_agent::{build, manifest_path_for, BuildRequest, Error};
use kiln_spool::manifest::ImageManifest;
use kiln_spool::time::Timestamp;

#[derive(Parser)]
#[command(version, about = "Builds OS images on this machine's disk")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Partition the disk, apply the payloads, configure, run the steps and capture the image.
    Build {
        /// The job file.
        #[arg(long)]
        job: PathBuf,
        /// Directory holding the job's payloads (each is read once, as a stream).
        #[arg(long)]
        payloads: PathBuf,
        /// A block device or a disk image file (created if missing, see --disk-size).
        #[arg(long)]
        disk: PathBuf,
        /// Size of a disk image file to create, e.g. 4GiB.
        #[arg(long)]
        disk_size: Option<String>,
        /// The image to write, IMAGE.raw.zst; the manifest goes to IMAGE.manifest.toml.
        #[arg(long)]
        out: PathBuf,
        /// The job log (default: IMAGE.log beside the image).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Agent id recorded in the manifest (default: the host name).
        #[arg(long)]
        agent_id: Option<String>,
        /// Where the target is mounted while it is built.
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        work_dir: PathBuf,
    },
    /// Capture an existing disk into IMAGE.raw.zst and IMAGE.manifest.toml.
    Capture {
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// zstd level, 1 to 22.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
    },
    /// Ask each job server in turn for work, claim, build, upload; repeat.
    Run {
        /// The agent config (kiln.KEY=VALUE words from --cmdline win).
        #[arg(long, default_value = "/etc/kiln/agent.toml")]
        config: PathBuf,
        /// Do one job and exit: 0 if one was built, 3 if none was available.
        #[arg(long)]
        once: bool,
        /// The disk to build on (overrides the config's disk).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Scratch space: job logs, mount points, images.
        #[arg(long, default_value = "/var/tmp/kiln")]
        work_dir: PathBuf,
        /// A kernel command line whose kiln.KEY=VALUE words override the config.
        #[arg(long)]
        cmdline: Option<String>,
        /// Upload chunk size.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        chunk_size: u64,
    },
    /// Write a signed image onto a disk, checking it range by range, and grow it to fill the disk.
    ///
    /// The manifest's signature is checked against the allowed signers, and
    /// the whole image against the signed manifest, before anything is
    /// written; any failure after that leaves the disk's partition table
    /// wiped. Exit status: 0 deployed, 1 failed, 2 refused before writing.
    Deploy {
        /// A published image directory (DIR/image.raw.zst, DIR/manifest.toml,
        /// DIR/manifest.toml.sig), or an IMAGE.raw.zst file (with
        /// IMAGE.manifest.toml and IMAGE.manifest.toml.sig beside it, as
        /// `kiln-agent capture` names them).
        #[arg(long)]
        image: PathBuf,
        /// The disk to write: a block device or a disk image file at least as large as the image's disk.
        #[arg(long)]
        disk: PathBuf,
        /// An allowed-signers file (`kiln-master signer` prints its line).
        #[arg(long)]
        signers: Option<PathBuf>,
        /// The agent config whose image_signers are used when --signers is absent.
        #[arg(long, default_value = "/etc/kiln/agent.toml")]
        config: PathBuf,
        /// The manifest (overrides the one found from --image).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The manifest's signature (default: the manifest's path with .sig appended).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Leave the partitions as they are on a disk larger than the image.
        #[arg(long)]
        no_grow: bool,
    },
    /// Check an image (IMAGE.raw.zst, or a raw disk) against its manifest.
    Verify {
        image: PathBuf,
        /// The manifest (default: IMAGE.manifest.toml beside the image).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    kiln_spool::units::parse_bytes(s)
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        kiln_agent::pid1::main()
    }
    let cli = Cli::parse();
    if let Cmd::Run {
        config,
        once,
        disk,
        work_dir,
        cmdline,
        chunk_size,
    } = &cli.command
    {
        return agent_run(
            config,
            *once,
            disk.as_deref(),
            work_dir,
            cmdline.as_deref(),
            *chunk_size,
        );
    }
    let abort = AtomicBool::new(false);
    let mut reporter = Reporter::new();
    let mut events = |e: &kiln_agent::Event| reporter.event(e);
    let r = match cli.command {
        Cmd::Build {
            job,
            payloads,
            disk,
            disk_size,
            out,
            log,
            agent_id,
            work_dir,
        } => run_build(
            &job,
            &payloads,
            &disk,
            disk_size.as_deref(),
            &out,
            log,
            agent_id,
            &work_dir,
            &mut events,
            &abort,
        ),
        Cmd::Run { .. } => unreachable!("handled above"),
        Cmd::Capture { disk, out, level } => run_capture(&disk, &out, level, &mut events, &abort),
        Cmd::Deploy {
            image,
            disk,
            signers,
            config,
            manifest,
            signature,
            no_grow,
        } => {
            let paths = DeployPaths::find(&image, manifest, signature);
            run_deploy(
                &paths,
                &disk,
                signers.as_deref(),
                &config,
                !no_grow,
                &mut events,
            )
        }
        Cmd::Verify { image, manifest } => {
            let mpath = manifest.unwrap_or_else(|| manifest_path_for(&image));
            kiln_agent::verify::load_manifest(&mpath)
                .and_then(|m| kiln_agent::verify::verify(&image, &m, &mut events, &abort))
                .map(|()| println!("{}: matches {}", image.display(), mpath.display()))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: {}", e.one_line());
            if e.is_input() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_build(
    job_path: &Path,
    payloads: &Path,
    disk: &Path,
    disk_size: Option<&str>,
    out: &Path,
    log: Option<PathBuf>,
    agent_id: Option<String>,
    work_dir: &Path,
    events: &mut dyn FnMut(&kiln_agent::Event),
    abort: &AtomicBool,
) -> Result<(), Error> {
    let job_text = std::fs::read_to_string(job_path)
        .map_err(|e| Error::Input(format!("{}: cannot read: {e}", job_path.display())))?;
    let job = kiln_spool::parse_job(&job_text)
        .map_err(|e| Error::Input(e.in_file(job_path).to_string()))?;
    if !disk.exists() {
        let Some(size) = disk_size else {
            return Err(Error::Input(format!(
                "disk {} does not exist; give --disk-size to create it",
                disk.display()
            )));
        };
        let bytes = kiln_spool::units::parse_bytes(size)
            .map_err(|e| Error::Input(format!("--disk-size: {e}")))?;
        let f = std::fs::File::create(disk)
            .map_err(|e| Error::Input(format!("creating disk image {}: {e}", disk.display())))?;
        f.set_len(bytes)
            .map_err(|e| Error::Input(format!("sizing disk image {}: {e}", disk.display())))?;
    }
    let log_path = log.unwrap_or_else(|| {
        let m = manifest_path_for(out);
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .replace(".manifest.toml", ".log");
        m.with_file_name(name)
    });
    let joblog = JobLog::create(&log_path)?;
    let agent_id = agent_id.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let payloads = PayloadDir(payloads);
    let req = BuildRequest {
        job: &job,
        job_text: &job_text,
        payloads: &payloads,
        disk,
        out,
        log: &joblog,
        agent_id: &agent_id,
        work_dir,
    };
    let m = build(&req, events, abort).map_err(|e| {
        if !e.is_input() {
            eprintln!(
                "kiln-agent: failed in {}; the job log is {}",
                e.phase,
                log_path.display()
            );
        }
        e.error
    })?;
    println!(
        "{}: {} bytes, {} data ranges, {} bytes read of a {}-byte disk",
        out.display(),
        m.image_size,
        m.ranges.len(),
        m.bytes_read,
        m.disk_size
    );
    Ok(())
}

fn run_capture(
    disk: &Path,
    out: &Path,
    level: i32,
    events: &mut dyn FnMut(&kiln_agent::Event),
    abort: &AtomicBool,
) -> Result<(), Error> {
    if !disk.exists() {
        return Err(Error::Input(format!(
            "disk {} does not exist",
            disk.display()
        )));
    }
    kiln_agent::disk::check_not_in_use(disk)?;
    let started = Timestamp::now();
    let t = std::time::Instant::now();
    events(&kiln_agent::Event {
        phase: kiln_agent::Phase::Capture,
        kind: kiln_agent::EventKind::Started,
    });
    let cap = capture(
        disk,
        out,
        &CaptureOptions { level, threads: 0 },
        events,
        abort,
    )?;
    let seconds = t.elapsed().as_secs_f64();
    events(&kiln_agent::Event {
        phase: kiln_agent::Phase::Capture,
        kind: kiln_agent::EventKind::Finished { seconds },
    });
    let m = ImageManifest {
        format: "raw.zst".into(),
        job: String::new(),
        job_blake3: String::new(),
        agent: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        disk_size: cap.disk_size,
        block_size: cap.block_size,
        bytes_read: cap.bytes_read,
        image_size: cap.image_size,
        image_blake3: cap.image_blake3,
        payloads: vec![],
        started,
        finished: Timestamp::now(),
        phases: vec![kiln_spool::manifest::PhaseTime {
            name: "capture".into(),
            seconds,
            started: Some(started),
        }],
        ranges: cap.ranges,
        generalized: Vec::new(),
        provenance: Some(kiln_agent::build::provenance(disk)),
    };
    let mpath = kiln_agent::build::write_manifest(out, &m)?;
    println!(
        "{}: {} bytes, {} data ranges, {} bytes read of a {}-byte disk in {seconds:.2}s; manifest {}",
        out.display(),
        m.image_size,
        m.ranges.len(),
        m.bytes_read,
        m.disk_size,
        mpath.display()
    );
    Ok(())
}

/// The files `kiln-agent deploy --image` names.
struct DeployPaths {
    image: PathBuf,
    manifest: PathBuf,
    signature: PathBuf,
}

impl DeployPaths {
    fn find(image: &Path, manifest: Option<PathBuf>, signature: Option<PathBuf>) -> DeployPaths {
        use kiln_spool::upload::{IMAGE_FILE, MANIFEST};
        let (image, found) = if image.is_dir() {
            (image.join(IMAGE_FILE), image.join(MANIFEST))
        } else {
            (image.to_path_buf(), manifest_path_for(image))
        };
        let manifest = manifest.unwrap_or(found);
        let signature = signature.unwrap_or_else(|| {
            let mut s = manifest.clone().into_os_string();
            s.push(".sig");
            PathBuf::from(s)
        });
        DeployPaths {
            image,
            manifest,
            signature,
        }
    }
}

/// The allowed image signers: --signers, else the config's image_signers.
fn deploy_signers(
    signers: Option<&Path>,
    config: &Path,
) -> Result<kiln_spool::signature::AllowedSigners, Error> {
    use kiln_spool::signature::AllowedSigners;
    const HOW: &str = "run `kiln-master signer` on the master and put the line it prints in a file for --signers, or in image_signers of the agent config";
    let allowed = match signers {
        Some(path) => AllowedSigners::load(path).map_err(|e| Error::Input(e.to_string()))?,
        None if config.exists() => {
            let cfg = kiln_spool::agent_config::load_agent_config(config)
                .map_err(|e| Error::Input(e.to_string()))?;
            AllowedSigners::parse(&cfg.image_signers.join("\n"))
                .map_err(|e| Error::Input(format!("{}: image_signers: {e}", config.display())))?
        }
        None => {
            return Err(Error::Input(format!(
                "no allowed image signer: there is no --signers and no {}; {HOW}",
                config.display()
            )))
        }
    };
    if allowed.is_empty() {
        let from = signers.unwrap_or(config);
        return Err(Error::Input(format!(
            "no allowed image signer in {}; {HOW}",
            from.display()
        )));
    }
    Ok(allowed)
}

fn run_deploy(
    paths: &DeployPaths,
    disk: &Path,
    signers: Option<&Path>,
    config: &Path,
    grow: bool,
    events: &mut dyn FnMut(&kiln_agent::Event),
) -> Result<(), Error> {
    use kiln_agent::deploy::{deploy, load_signed, DeployOptions, FileSource, Grown};
    let signers = deploy_signers(signers, config)?;
    let signed = load_signed(&paths.manifest, &paths.signature, &signers)?;
    eprintln!(
        "kiln-agent: {} is signed by {}",
        paths.manifest.display(),
        signed.signer
    );
    // Ctrl-C stops the deploy where it is and wipes the partition table.
    static STOP: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| STOP.store(true, std::sync::atomic::Ordering::SeqCst));
    let t = std::time::Instant::now();
    let r = deploy(
        &signed,
        &mut FileSource(paths.image.clone()),
        disk,
        &DeployOptions {
            grow,
            precheck: true,
        },
        events,
        &STOP,
    )?;
    let m = &signed.manifest;
    let grown = match &r.grow {
        Some(Grown::Partition { number, .. }) => {
            format!(", partition {number} grown to fill {} bytes", r.disk_size)
        }
        Some(Grown::Nothing(why)) => format!(", not grown: {why}"),
        None => String::new(),
    };
    println!(
        "{}: {} bytes written in {} data ranges, read back and matching {}{grown}, in {:.2}s",
        disk.display(),
        r.bytes_written,
        m.ranges.len(),
        paths.manifest.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `kiln-agent run`: exit 0 when done (or one job built with --once), 3 when
/// --once found no job, 1 when a job or the agent failed, 2 for a bad config.
fn agent_run(
    config: &Path,
    once: bool,
    disk: Option<&Path>,
    work_dir: &Path,
    cmdline: Option<&str>,
    chunk_size: u64,
) -> ExitCode {
    use kiln_agent::run::{default_agent_id, run, Outcome, RunOptions};
    let mut cfg = match kiln_spool::agent_config::load_agent_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(line) = cmdline {
        if let Err(e) = cfg.apply_cmdline(line) {
            eprintln!("kiln-agent: kernel command line: {e}");
            return ExitCode::from(2);
        }
    }
    let disk = match disk {
        Some(d) => d.to_path_buf(),
        None if cfg.disk != "auto" => PathBuf::from(&cfg.disk),
        None => {
            eprintln!("kiln-agent: disk = \"auto\" is chosen at boot by PID 1; give --disk or a disk in {}", config.display());
            return ExitCode::from(2);
        }
    };
    let agent_id = cfg.id.clone().unwrap_or_else(default_agent_id);
    let opts = RunOptions {
        config: cfg,
        agent_id,
        disk,
        work_dir: work_dir.to_path_buf(),
        once,
        upload: kiln_spool::agent::uploader::UploadOptions { chunk_size },
        session: Default::default(),
    };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    eprintln!(
        "kiln-agent: {} polling {} server(s)",
        opts.agent_id,
        opts.config.servers.len()
    );
    match run(&opts, &stop, &mut |line| eprintln!("kiln-agent: {line}")) {
        Ok(Outcome::Built { job }) => {
            // A build uploaded, or a deploy written and reported.
            eprintln!("kiln-agent: finished {job}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::NothingToDo) if once => {
            eprintln!("kiln-agent: no job available");
            ExitCode::from(3)
        }
        Ok(Outcome::NothingToDo) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}
