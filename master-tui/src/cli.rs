//! The headless subcommands of `kiln-master`.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad input.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_spool::master::reap_locking;
use kiln_spool::master::{self, JobState, JobView, MasterError};
use kiln_spool::names::check_payload_name;
use kiln_spool::printable::{needs_escape, printable};
use kiln_spool::spool::{payload_path, JOB_LIST, PAYLOADS};
use kiln_spool::stream::HashReader;
use kiln_spool::time::{format_secs, Timestamp};
use kiln_spool::units::{human_bytes, Span};
use kiln_spool::LocalSpool;

/// The kiln master: keeps the job list, reaps expired leases, publishes
/// verified images, and gives the operator a console (`kiln-master tui`).
#[derive(Parser, Debug)]
#[command(name = "kiln-master", version, about, long_about = None)]
pub struct Cli {
    /// The spool directory.
    #[arg(long, global = true, env = "KILN_SPOOL", default_value = "./spool")]
    pub spool: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the spool's directories and an empty job list, or repair them.
    /// With --agent-user (as root): the spool belongs to the master's
    /// account and agents, logging in as USER, can write only where agents write.
    Init {
        /// The agents' sshd account; created if missing.
        #[arg(long, value_name = "USER")]
        agent_user: Option<String>,
        /// The account the spool belongs to (default: the one running init).
        #[arg(long, value_name = "USER", requires = "agent_user")]
        master_user: Option<String>,
    },
    /// Manage payload archives in the spool.
    #[command(subcommand)]
    Payload(PayloadCommand),
    /// Validate job files, pin their payloads' hashes and queue them.
    Add {
        #[arg(required = true, value_name = "JOB.toml")]
        files: Vec<PathBuf>,
    },
    /// List jobs in the order agents take them, then finished ones.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: its state, lease, status and spec; for a published
    /// image its provenance, signature and deployments; for a deploy job
    /// what it wrote where.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the allowed-signers line of the master's image signing key, for
    /// `ssh-keygen -Y verify -f` and the agents' `image_signers`.
    Signer {
        /// The principal the line names (`ssh-keygen -Y verify -I`).
        #[arg(long, value_name = "NAME", default_value = kiln_spool::signature::DEFAULT_PRINCIPAL)]
        principal: String,
    },
    /// Check a published image: the signature over its manifest, the
    /// manifest, and the image file's size and BLAKE3.
    Verify {
        id: String,
        /// An allowed-signers file to check the signature with (default:
        /// the master's own key).
        #[arg(long, value_name = "FILE")]
        signers: Option<PathBuf>,
    },
    /// Set a job's priority (0 to 1000, higher is taken first).
    Priority { id: String, priority: u32 },
    /// Cancel a job; an agent holding it stops at its next heartbeat.
    Cancel { id: String },
    /// Put a failed, invalid or cancelled job back in the queue.
    Requeue { id: String },
    /// One pass: reclaim expired leases and publish verified uploads.
    Reap,
    /// Reap and publish in a loop until Ctrl-C.
    Serve {
        /// Time between passes.
        #[arg(long, default_value = "2s", value_parser = parse_interval)]
        interval: Span,
    },
    /// The operator's terminal UI over the spool.
    Tui,
    /// Write boot.ipxe, the kernel and the initramfs into a directory that
    /// TFTP or HTTP serves to PXE-booting machines.
    Pxe {
        /// The directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The kernel (vmlinuz).
        #[arg(long)]
        kernel: PathBuf,
        /// The initramfs made by kiln-initramfs.
        #[arg(long)]
        initramfs: PathBuf,
        /// Kernel command line; add kiln.KEY=VALUE to override the agent's config.
        #[arg(long, default_value = kiln_initramfs::pxe::DEFAULT_CMDLINE)]
        cmdline: String,
    },
    /// Write a published image, checked against its manifest, in forms
    /// other tools take: ID.img.zst (or a sparse ID.img) with ID.img.bmap
    /// for `bmaptool copy`, or ID.qcow2 for VMs and clouds.
    Export(crate::export::ExportArgs),
    /// Make the ed25519 key pair agents log in with, the authorized_keys file
    /// and the sshd drop-in that confine it to SFTP in the spool.
    AgentKey {
        /// Directory for the key pair and the sshd files (root's, e.g. /etc/kiln/agent-key).
        #[arg(long)]
        out: PathBuf,
        /// The agents' sshd account.
        #[arg(long, value_name = "USER", default_value = crate::agent_key::AGENT_USER)]
        agent_user: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PayloadCommand {
    /// Copy an archive into the spool's payloads/ and print its BLAKE3.
    Add {
        file: PathBuf,
        /// Name under payloads/ (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
}

fn parse_interval(s: &str) -> Result<Span, String> {
    kiln_spool::units::parse_span(s)
}

/// An error with the exit code it deserves.
#[derive(Debug)]
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        let code = match error.downcast_ref::<MasterError>() {
            Some(e) if e.is_bad_input() => 2,
            _ => 1,
        };
        Failure { code, error }
    }
}

impl From<MasterError> for Failure {
    fn from(e: MasterError) -> Self {
        anyhow::Error::from(e).into()
    }
}

fn bad_input(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Tui) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(io::stderr)
            .with_target(false)
            .init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // An error can quote what an agent wrote (a lease that does not parse).
            eprintln!("kiln-master: {}", printable(&format!("{:#}", f.error)));
            ExitCode::from(f.code)
        }
    }
}

fn open_spool(path: &Path) -> Result<LocalSpool, Failure> {
    let spool = LocalSpool::new(path);
    if !spool.path(JOB_LIST).exists() {
        return Err(bad_input(anyhow::anyhow!(
            "{} is not a spool (no {JOB_LIST}); create one with `kiln-master --spool {} init`",
            path.display(),
            path.display()
        )));
    }
    Ok(spool)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let now = Timestamp::now();
    match cli.command {
        Command::Export(args) => {
            let spool = open_spool(&cli.spool)?;
            crate::export::run(&spool, &args).map_err(bad_input)?;
        }
        Command::Init {
            agent_user,
            master_user,
        } => {
            let opts = crate::init::InitOptions {
                spool: cli.spool.clone(),
                agent_user,
                master_user,
            };
            crate::init::run(&opts, &mut io::stdout().lock())?;
        }
        Command::Payload(PayloadCommand::Add { file, name }) => {
            let spool = open_spool(&cli.spool)?;
            let (name, hash, size) = add_payload(&spool, &file, name.as_deref())?;
            println!("{hash}  {PAYLOADS}/{name} ({})", human_bytes(size));
        }
        Command::Add { files } => {
            let spool = open_spool(&cli.spool)?;
            let _lock = lock(&spool)?;
            let mut failed: Option<Failure> = None;
            let mut refused = 0;
            for file in &files {
                let text = match std::fs::read_to_string(file) {
                    Ok(t) => t,
                    Err(e) => {
                        let f = bad_input(
                            anyhow::Error::new(e).context(format!("reading {}", file.display())),
                        );
                        eprintln!("kiln-master: {:#}", f.error);
                        failed = Some(f);
                        refused += 1;
                        continue;
                    }
                };
                match master::add_job(&spool, &text, file, now) {
                    Ok(e) => println!(
                        "queued {} (priority {}, time limit {})",
                        e.id, e.priority, e.time_limit
                    ),
                    Err(e) => {
                        let f = Failure::from(e);
                        eprintln!("kiln-master: {:#}", f.error);
                        failed = Some(f);
                        refused += 1;
                    }
                }
            }
            if let Some(f) = failed {
                return Err(Failure {
                    code: f.code,
                    error: anyhow::anyhow!("{refused} of {} job files not added", files.len()),
                });
            }
        }
        Command::List { json } => {
            let spool = open_spool(&cli.spool)?;
            let views = master::job_views(&spool, now)?;
            if json {
                println!("{}", json_text(&views)?);
            } else {
                print!("{}", format_table(&views));
            }
        }
        Command::Show { id, json } => {
            let spool = open_spool(&cli.spool)?;
            let view = master::job_view(&spool, &id, now)?;
            let spec = master::read_job_spec(&spool, &id).ok();
            // A damaged publication is reported, not allowed to hide the job.
            let image = crate::show::image(&spool, &id).map_err(|e| e.to_string());
            let deployment = crate::show::deployment(&spool, &id)?;
            if json {
                let value = serde_json::json!({
                    "job": view,
                    "lease": view.lease.as_ref().map(|l| serde_json::json!({
                        "agent": l.agent, "token": l.token, "acquired": l.acquired.to_string(),
                        "deadline": l.deadline.to_string(), "attempt": l.attempt,
                    })),
                    "spec": spec.as_ref().map(|(text, _)| text),
                    "image": image.as_ref().ok().and_then(|i| i.as_ref()).map(|i| i.json()),
                    "image_error": image.as_ref().err(),
                    "deployment": deployment,
                });
                println!("{}", json_text(&value)?);
            } else {
                print!(
                    "{}",
                    format_show(&view, spec.as_ref().map(|(t, _)| t.as_str()))
                );
                match &image {
                    Ok(Some(i)) => print!("{}", i.text()),
                    Ok(None) => {}
                    Err(e) => print!("\n# image\nunreadable: {}\n", printable(e)),
                }
                if let Some(d) = &deployment {
                    print!("{}", crate::provenance::format_deployment(d));
                }
            }
        }
        Command::Signer { principal } => {
            let spool = open_spool(&cli.spool)?;
            println!("{}", crate::show::signer_line(&spool, &principal)?);
        }
        Command::Verify { id, signers } => {
            let spool = open_spool(&cli.spool)?;
            crate::show::verify(&spool, &id, signers.as_deref())?;
        }
        Command::Priority { id, priority } => {
            let spool = open_spool(&cli.spool)?;
            let _lock = lock(&spool)?;
            master::set_priority(&spool, &id, priority)?;
            println!("{id}: priority {priority}");
        }
        Command::Cancel { id } => {
            let spool = open_spool(&cli.spool)?;
            let _lock = lock(&spool)?;
            master::cancel(&spool, &id, now)?;
            println!("{id}: cancelled");
        }
        Command::Requeue { id } => {
            let spool = open_spool(&cli.spool)?;
            let _lock = lock(&spool)?;
            master::requeue(&spool, &id, now)?;
            println!("{id}: queued");
        }
        Command::Reap => {
            let spool = open_spool(&cli.spool)?;
            let report = reap_locking(&spool, &|| now)?;
            for line in report.lines() {
                println!("{}", printable(&line));
            }
            if report.is_empty() {
                println!("nothing to do");
            }
        }
        Command::Serve { interval } => {
            let spool = open_spool(&cli.spool)?;
            serve(&spool, interval.0)?;
        }
        Command::Pxe {
            out,
            kernel,
            initramfs,
            cmdline,
        } => {
            for (what, path) in [("--kernel", &kernel), ("--initramfs", &initramfs)] {
                if !path.is_file() {
                    return Err(bad_input(anyhow::anyhow!(
                        "{what} {}: no such file",
                        path.display()
                    )));
                }
            }
            let script = kiln_initramfs::pxe::write_dir(&out, &kernel, &initramfs, &cmdline)
                .map_err(anyhow::Error::from)?;
            println!(
                "wrote {}, {} and {}",
                script.display(),
                out.join(kiln_initramfs::pxe::KERNEL).display(),
                out.join(kiln_initramfs::pxe::INITRAMFS).display()
            );
            println!(
                "serve {} over TFTP or HTTP and point DHCP's boot file at {}",
                out.display(),
                kiln_initramfs::pxe::BOOT_SCRIPT
            );
            // The agent's config is built into the initramfs by
            // kiln-initramfs, not written here: say what it needs for
            // deploy jobs.
            let spool = LocalSpool::new(&cli.spool);
            if let Ok(Some(key)) = master::signing::load_key(&spool) {
                println!(
                    "for deploy jobs the agent config given to kiln-initramfs --agent-config needs \
                     image_signers = ['{}']",
                    key.allowed_signers_line(kiln_spool::signature::DEFAULT_PRINCIPAL)
                );
            }
        }
        Command::AgentKey { out, agent_user } => {
            let opts = crate::agent_key::AgentKeyOptions {
                out,
                spool: cli.spool.clone(),
                agent_user,
            };
            crate::agent_key::run(&opts, &mut io::stdout().lock())?;
        }
        Command::Tui => {
            let spool = open_spool(&cli.spool)?;
            crate::tui::run(spool.root())?;
        }
    }
    Ok(())
}

fn lock(spool: &LocalSpool) -> Result<kiln_spool::spool::MasterLock, Failure> {
    Ok(spool
        .lock()
        .with_context(|| format!("locking {}", spool.root().display()))?)
}

/// `, 412.0 MiB of 731.0 MiB` when the phase counts bytes.
fn bytes_of(s: &kiln_spool::status::Status) -> String {
    if s.bytes_total == 0 {
        return String::new();
    }
    format!(
        ", {} of {}",
        human_bytes(s.bytes_done),
        human_bytes(s.bytes_total)
    )
}

/// Copies a payload into the spool, hashing it on the way. An existing
/// payload of the same name is kept unless it is the same file.
fn add_payload(
    spool: &LocalSpool,
    file: &Path,
    name: Option<&str>,
) -> Result<(String, String, u64), Failure> {
    let name = match name {
        Some(n) => n.to_string(),
        None => file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                bad_input(anyhow::anyhow!(
                    "{}: cannot take a payload name from it; pass --name",
                    file.display()
                ))
            })?,
    };
    check_payload_name(&name)
        .map_err(|p| bad_input(anyhow::anyhow!("--name: payload name {p}")))?;
    let mut src = File::open(file)
        .with_context(|| format!("opening {}", file.display()))
        .map_err(bad_input)?;
    let rel = payload_path(&name);
    let target = spool.path(&rel);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = spool.path(&kiln_spool::spool::temp_name(&rel));
    let result = (|| -> anyhow::Result<(String, u64)> {
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut hashed = HashReader::new(&mut src);
        std::io::copy(&mut hashed, &mut out)
            .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))?;
        out.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        let d = hashed.digest();
        Ok((d.blake3, d.size))
    })();
    let (hash, size) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    if let Some(existing) = master::hash_payload(spool, &name)? {
        let _ = std::fs::remove_file(&tmp);
        if existing != hash {
            return Err(bad_input(anyhow::anyhow!(
                "{rel} already exists with BLAKE3 {existing}; jobs may pin it, so it is kept (choose another --name)"
            )));
        }
        return Ok((name, hash, size));
    }
    // link(2) never replaces an existing payload, even one added meanwhile.
    let placed =
        std::fs::hard_link(&tmp, &target).with_context(|| format!("placing {}", target.display()));
    let _ = std::fs::remove_file(&tmp);
    placed?;
    Ok((name, hash, size))
}

fn serve(spool: &LocalSpool, interval: Duration) -> Result<(), Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    eprintln!(
        "kiln-master: serving {} every {}; Ctrl-C stops",
        spool.root().display(),
        Span(interval)
    );
    while !stop.load(Ordering::SeqCst) {
        match reap_locking(spool, &Timestamp::now) {
            Ok(report) => {
                for line in report.lines() {
                    println!("{} {}", Timestamp::now(), printable(&line));
                }
            }
            Err(e) => eprintln!("kiln-master: reap failed: {}", printable(&format!("{e:#}"))),
        }
        let until = std::time::Instant::now() + interval;
        while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("kiln-master: stopped");
    Ok(())
}

fn format_table(views: &[JobView]) -> String {
    let mut rows = vec![[
        "ID",
        "PRIO",
        "STATE",
        "HOLDER",
        "PHASE",
        "PROGRESS",
        "LEASE LEFT",
        "ATTEMPTS",
    ]
    .map(String::from)];
    for v in views {
        rows.push([
            printable(&v.id).into_owned(),
            v.priority.to_string(),
            v.state.to_string(),
            v.holder.as_deref().map_or("-".into(), shown),
            v.phase.map_or("-".into(), |p| p.to_string()),
            v.progress
                .map(|p| format!("{:.0}%", p * 100.0))
                .unwrap_or_else(|| "-".into()),
            v.remaining.map(format_secs).unwrap_or_else(|| "-".into()),
            format!("{}/{}", v.attempts, v.max_attempts),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let failed: Vec<&JobView> = views
        .iter()
        .filter(|v| {
            matches!(v.state, JobState::Failed | JobState::Invalid) && !v.message.is_empty()
        })
        .collect();
    for v in failed {
        out.push_str(&format!(
            "{}: {}\n",
            printable(&v.id),
            printable(&v.message)
        ));
    }
    out
}

fn format_show(v: &JobView, spec: Option<&str>) -> String {
    let mut out = format!(
        "job        {}\nstate      {}\npriority   {}\nattempts   {}/{}\nsubmitted  {}\n",
        printable(&v.id),
        v.state,
        v.priority,
        v.attempts,
        v.max_attempts,
        v.submitted
    );
    if let Some(l) = &v.lease {
        out.push_str(&format!(
            "lease      {} (token {}), acquired {}, deadline {} ({} left)\n",
            printable(&l.agent),
            printable(&l.token),
            l.acquired,
            l.deadline,
            v.remaining.map(format_secs).unwrap_or_default()
        ));
    } else if let Some(h) = &v.holder {
        out.push_str(&format!("built by   {}\n", printable(h)));
    }
    if let Some(s) = &v.status {
        out.push_str(&format!(
            "status     {:?} in {} ({:.0}%{}), updated {}\n",
            s.state,
            s.phase,
            s.progress * 100.0,
            bytes_of(s),
            s.updated
        ));
    }
    if !v.message.is_empty() {
        out.push_str(&format!("message    {}\n", printable(&v.message)));
    }
    if let Some(text) = spec {
        out.push_str("\n# spec\n");
        for line in text.lines() {
            out.push_str(&printable(line));
            out.push('\n');
        }
    }
    out
}

/// Pretty JSON that is also safe on a terminal: serde_json escapes C0
/// controls, and DEL, C1 controls and bidi controls (which can only occur
/// inside strings) become `\uXXXX` too, so the value read back is the same.
fn json_text(value: &impl serde::Serialize) -> anyhow::Result<String> {
    let text = serde_json::to_string_pretty(value).context("writing JSON")?;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if needs_escape(c) && c != '\n' {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// An agent-written field for a table cell.
fn shown(s: &str) -> String {
    printable(s).into_owned()
}
