//! A held `kind = "deploy"` job: the published image it names is checked
//! (the job's pin on its manifest, the master's signature against the
//! agent's `image_signers`), streamed from the job server onto the disk
//! range by range, and reported in `deployed.toml` in the lease's upload
//! directory. Nothing reaches the disk before the signature is good.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use kiln_spool::agent::published::{
    fetch_published, image_file_path, write_deploy_report, OwnedReader,
};
use kiln_spool::agent_config::{AgentConfig, Server};
use kiln_spool::job::{Deploy, JobSpec};
use kiln_spool::manifest::PhaseTime;
use kiln_spool::signature::AllowedSigners;
use kiln_spool::status::AgentState;
use kiln_spool::time::Timestamp;
use kiln_spool::upload::DeployReport;

use super::job::HeldJob;
use super::{connect, RunOptions};
use crate::build::phase_time;
use crate::deploy::{check_signed, deploy, DeployOptions, ImageSource, SignedImage};
use crate::progress::{Event, EventKind, Phase};

/// What a finished deploy asks of the agent.
pub(super) struct Deployed {
    /// The job wants the machine to boot the deployed system now.
    pub reboot: bool,
}

/// The keys the agent accepts image signatures from. A deploy job is
/// refused outright when there are none: an agent that checks nothing must
/// write nothing.
pub(super) fn image_signers(config: &AgentConfig) -> Result<AllowedSigners> {
    if config.image_signers.is_empty() {
        bail!(
            "deploy jobs are refused: the agent config has no image_signers \
             (add the line `kiln-master signer` prints)"
        );
    }
    let signers = AllowedSigners::parse(&config.image_signers.join("\n"))
        .map_err(|e| anyhow!("the agent config's image_signers: {e}"))?;
    if signers.is_empty() {
        bail!(
            "deploy jobs are refused: no line of the agent config's image_signers \
             allows the kiln-image namespace"
        );
    }
    Ok(signers)
}

/// The disk a deploy writes: the agent's own. A job may name it (or say
/// `auto`) but never point the agent at another one.
fn deploy_disk(opts: &RunOptions, job: &JobSpec) -> Result<PathBuf> {
    let device = job.disk.device.as_str();
    if device.is_empty() || device == "auto" || Path::new(device) == opts.disk {
        return Ok(opts.disk.clone());
    }
    // The same disk by another name (`/dev/disk/by-id/...`).
    let same = match (
        std::fs::canonicalize(device),
        std::fs::canonicalize(&opts.disk),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Ok(opts.disk.clone());
    }
    bail!(
        "disk.device: the job names {device:?}, but this agent writes only its own disk {}",
        opts.disk.display()
    )
}

/// The published image file on the job server, read on a new session each
/// time it is opened (the check pass, then the write pass), so that a link
/// cut in one pass does not fail the next. At most the manifest's image
/// size is read.
struct ServerImage<'a> {
    opts: &'a RunOptions,
    server: &'a Server,
    path: String,
    size: u64,
}

impl ImageSource for ServerImage<'_> {
    fn open(&mut self) -> io::Result<Box<dyn Read + Send>> {
        let spool =
            connect(self.opts, self.server).map_err(|e| io::Error::other(format!("{e:#}")))?;
        let r = OwnedReader::open(spool, &self.path)?;
        Ok(Box::new(r.take(self.size)))
    }

    fn describe(&self) -> String {
        format!("{} on {}", self.path, self.server.address)
    }
}

/// Deploys the image the held job names onto the agent's disk and reports
/// it. `download` is the job file's phase.
pub(super) fn deploy_job(held: &HeldJob, job: &JobSpec, download: PhaseTime) -> Result<Deployed> {
    // The job began with its download.
    let started = download.started.unwrap_or_else(Timestamp::now);
    let spec: &Deploy = job
        .deploy
        .as_ref()
        .ok_or_else(|| anyhow!("deploy: a kind = \"deploy\" job needs [deploy] image = \"ID\""))?;
    held.beat.set(|st| {
        st.state = AgentState::Deploying;
        st.message = format!("image {}", spec.image);
    });
    held.step(&format!("deploy of image {} (job {})", spec.image, job.id));

    let check_started = Timestamp::now();
    let t = Instant::now();
    held.on_event(&Event {
        phase: Phase::Check,
        kind: EventKind::Started,
    });
    let signers = image_signers(&held.opts.config)?;
    let disk = deploy_disk(held.opts, job)?;
    let signed = check_image(held, spec, &signers)?;
    let check_seconds = t.elapsed().as_secs_f64();
    held.on_event(&Event {
        phase: Phase::Check,
        kind: EventKind::Finished {
            seconds: check_seconds,
        },
    });
    let check = phase_time(Phase::Check, check_started, check_seconds);

    held.step(&format!(
        "writing {} ({} bytes of data in {} ranges) onto {}",
        spec.image,
        signed.manifest.data_bytes(),
        signed.manifest.ranges.len(),
        disk.display()
    ));
    let mut source = ServerImage {
        opts: held.opts,
        server: held.server,
        path: image_file_path(&spec.image),
        size: signed.manifest.image_size,
    };
    // The image streams straight from the server onto the disk, fetched
    // once: every range is checked as it arrives, and one that does not
    // match stops the write with the partition table wiped.
    let opts = DeployOptions {
        grow: spec.grow,
        precheck: false,
    };
    let mut events = |e: &Event| held.on_event(e);
    let result = deploy(
        &signed,
        &mut source,
        &disk,
        &opts,
        &mut events,
        &held.beat.abort,
    )
    .with_context(|| format!("deploying {} onto {}", spec.image, disk.display()))?;
    held.step(&format!(
        "deployed: {} bytes written and read back on a {}-byte disk{}",
        result.bytes_written,
        result.disk_size,
        if result.grown {
            ", the last partition grown to fill it"
        } else {
            ""
        }
    ));

    // The deploy's own check (the disk, a pass over the image) continues
    // the signature's: one phase from the fetch to the last byte hashed.
    let mut phases = vec![download];
    let mut rest = result.phases.iter().cloned().peekable();
    match rest.next_if(|p| p.name == check.name) {
        Some(p) => phases.push(PhaseTime {
            seconds: ((check.seconds + p.seconds) * 1000.0).round() / 1000.0,
            ..check
        }),
        None => phases.push(check),
    }
    phases.extend(rest);
    let report = DeployReport {
        job: job.id.clone(),
        image: spec.image.clone(),
        manifest_blake3: signed.manifest_blake3.clone(),
        image_blake3: signed.manifest.image_blake3.clone(),
        agent: held.opts.agent_id.clone(),
        disk: disk.display().to_string(),
        disk_size: result.disk_size,
        grown: result.grown,
        bytes_written: result.bytes_written,
        started,
        finished: Timestamp::now(),
        phases,
        hardware: crate::hardware::summary(&disk),
    };
    held.log.sync();
    let log = std::fs::read(held.log_file()).ok();
    let written = write_deploy_report(held.spool, held.lease, &report, log.as_deref())
        .or_else(|e| {
            if e.is_lease_lost() {
                return Err(anyhow!(e));
            }
            // A link that dropped during the deploy: once more, on a new session.
            let fs = held.reconnect()?;
            write_deploy_report(&fs, held.lease, &report, log.as_deref()).map_err(|e| anyhow!(e))
        })
        .context("reporting the deploy")?;
    held.step(&format!("wrote {written}"));
    held.beat.set(|st| {
        st.state = AgentState::Deployed;
        st.progress = 1.0;
        st.message = format!(
            "{} onto {}: {} bytes written{}",
            spec.image,
            disk.display(),
            result.bytes_written,
            if result.grown { ", grown" } else { "" }
        );
    });
    Ok(Deployed {
        reboot: spec.reboot,
    })
}

/// Fetches the image's manifest and signature, holds the manifest to the
/// job's pin, and checks the signature.
fn check_image(held: &HeldJob, spec: &Deploy, signers: &AllowedSigners) -> Result<SignedImage> {
    let files = fetch_published(held.spool, &spec.image)?;
    held.step(&format!(
        "fetched {} ({} bytes) and {}",
        files.manifest_path,
        files.manifest.len(),
        files.signature_path
    ));
    if let Some(pin) = &spec.manifest_blake3 {
        let got = blake3::hash(&files.manifest).to_hex().to_string();
        if &got != pin {
            bail!(
                "{}: its BLAKE3 is {got}, but the job's deploy.manifest_blake3 pins {pin}: \
                 the image was published again since the job was queued",
                files.manifest_path
            );
        }
    }
    let signed = check_signed(&files.manifest, &files.signature, signers).with_context(|| {
        format!(
            "checking {} against its signature {}",
            files.manifest_path, files.signature_path
        )
    })?;
    if signed.manifest.job != spec.image {
        bail!(
            "{}: the signed manifest is of image {:?}, not {:?}",
            files.manifest_path,
            signed.manifest.job,
            spec.image
        );
    }
    held.step(&format!(
        "{} is signed by {} (manifest BLAKE3 {})",
        files.manifest_path, signed.signer, signed.manifest_blake3
    ));
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::agent_config::parse_agent_config;
    use kiln_spool::parse_job;

    const CONFIG: &str = "[[servers]]\naddress = \"10.0.2.2:2222\"\nkey = \"/etc/kiln/agent_key\"\n\
                          host_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG host\"\nspool = \"/srv/kiln\"\n";

    fn opts(disk: &Path, config: &str) -> RunOptions {
        RunOptions {
            config: parse_agent_config(config).unwrap(),
            agent_id: "agent-1".into(),
            disk: disk.to_path_buf(),
            work_dir: PathBuf::from("/nonexistent"),
            once: true,
            upload: Default::default(),
            session: Default::default(),
        }
    }

    fn job(device: &str) -> JobSpec {
        parse_job(&format!(
            "id = \"d\"\nkind = \"deploy\"\n[disk]\ndevice = \"{device}\"\n[deploy]\nimage = \"web\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_deploy_writes_only_the_agents_own_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        let o = opts(&disk, CONFIG);
        assert_eq!(deploy_disk(&o, &job("auto")).unwrap(), disk);
        let e = deploy_disk(&o, &job("/dev/sdz")).unwrap_err().to_string();
        assert!(
            e.starts_with("disk.device: the job names \"/dev/sdz\""),
            "{e}"
        );
        assert!(e.contains(&disk.display().to_string()), "{e}");
    }

    #[test]
    fn no_image_signers_refuses_every_deploy() {
        let e = image_signers(&opts(Path::new("/dev/vda"), CONFIG).config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused") && e.contains("image_signers"), "{e}");
        let key = kiln_spool::signature::SigningKey::generate("m").unwrap();
        let line = key.allowed_signers_line("kiln-master");
        let config = format!("image_signers = ['{line}']\n{CONFIG}");
        let signers = image_signers(&opts(Path::new("/dev/vda"), &config).config).unwrap();
        assert!(!signers.is_empty());
    }
}
