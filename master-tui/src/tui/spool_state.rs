//! What the console shows, read from the spool in one pass: the job views,
//! the agents seen in status records and history, and the published images.
//! Loading happens off the UI thread; the result reaches `update` as a message.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use kiln_spool::manifest::{ImageManifest, PhaseTime, Provenance};
use kiln_spool::master::provenance::{master_signers, read_image, SignatureCheck};
use kiln_spool::master::{job_views, read_job_spec, JobState, JobView};
use kiln_spool::printable::printable_log_line;
use kiln_spool::spool::{image_dir, log_path, status_path, IMAGES, STATUS};
use kiln_spool::status::Status;
use kiln_spool::time::Timestamp;
use kiln_spool::untrusted;
use kiln_spool::upload::{Published, JOB_LOG, MANIFEST, PUBLISHED};
use kiln_spool::{JobSpec, LocalSpool, SpoolFs};

/// An agent's last heartbeat older than this, while it holds a job, is stale.
pub const STALE_AFTER_SECS: i64 = 60;
/// How much of the end of a job log the detail pane reads.
const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// How many lines of a job log are kept.
const LOG_TAIL_LINES: usize = 400;

/// Everything the panes list, as of one read of the spool.
#[derive(Debug, Clone, Default)]
pub struct SpoolState {
    /// Every job: the job list in the order agents take jobs, then finished jobs.
    pub jobs: Vec<JobView>,
    pub agents: Vec<AgentRow>,
    pub images: Vec<ImageRow>,
}

/// One agent, as seen in status records and in history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentRow {
    pub id: String,
    /// The job server it reached this spool as, from its latest heartbeat.
    pub server: String,
    /// The job it holds now, if any.
    pub job: Option<String>,
    pub phase: Option<kiln_spool::status::Phase>,
    /// Its latest heartbeat on any job.
    pub last_heartbeat: Option<Timestamp>,
    /// Jobs it built whose images were published.
    pub done: u32,
}

impl AgentRow {
    /// Holding a job without a heartbeat for too long.
    pub fn is_stale(&self, now: Timestamp) -> bool {
        self.job.is_some()
            && self
                .last_heartbeat
                .is_none_or(|t| t.secs_until(now) > STALE_AFTER_SECS)
    }
}

/// One published image: `images/<id>/published.toml` and its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub job: String,
    pub agent: String,
    pub published: Timestamp,
    pub image_size: u64,
    pub disk_size: u64,
    /// Bytes of the disk that held data (from the manifest's block map).
    pub data_bytes: Option<u64>,
    pub image_blake3: String,
    /// How the image was made, from its signed manifest.
    pub provenance: Option<Provenance>,
    pub phases: Vec<PhaseTime>,
    /// The manifest's signature checked against the master's key.
    pub signature: SignatureCheck,
}

impl ImageRow {
    /// How many times smaller the image is than the data it holds.
    pub fn ratio(&self) -> Option<f64> {
        let data = self.data_bytes?;
        (self.image_size > 0 && data > 0).then(|| data as f64 / self.image_size as f64)
    }
}

/// The selected job's spec, status extras and log, loaded on demand.
#[derive(Debug, Clone)]
pub struct Detail {
    pub id: String,
    pub spec: Result<JobSpec, String>,
    /// The spool path the log came from, if there is one.
    pub log_source: Option<String>,
    pub log: Vec<String>,
}

impl SpoolState {
    /// Reads the whole spool; `now` only feeds the views' lease arithmetic.
    pub fn load(spool: &LocalSpool, now: Timestamp) -> anyhow::Result<Self> {
        let jobs =
            job_views(spool, now).map_err(|e| anyhow::anyhow!("reading the job list: {e}"))?;
        let statuses = read_statuses(spool);
        let agents = collect_agents(&jobs, &statuses);
        let images = read_images(spool);
        Ok(SpoolState {
            jobs,
            agents,
            images,
        })
    }

    /// How many jobs are in each state, in [`JobState::ALL`] order.
    pub fn counts(&self) -> [usize; 7] {
        let mut out = [0; 7];
        for j in &self.jobs {
            out[state_index(j.state)] += 1;
        }
        out
    }
}

pub fn state_index(s: JobState) -> usize {
    JobState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// Every heartbeat in `status/`, whether or not its lease is still current.
fn read_statuses(spool: &LocalSpool) -> Vec<Status> {
    let names = spool.list(STATUS).unwrap_or_else(|e| {
        tracing::warn!("listing {STATUS}/: {e}");
        vec![]
    });
    names
        .iter()
        .filter_map(|n| n.strip_suffix(".toml"))
        .filter_map(|id| {
            untrusted::status(spool, id)
                .map_err(|e| tracing::debug!("skipping {}: {e}", status_path(id)))
                .ok()
                .flatten()
        })
        .collect()
}

fn collect_agents(jobs: &[JobView], statuses: &[Status]) -> Vec<AgentRow> {
    let mut agents: BTreeMap<String, AgentRow> = BTreeMap::new();
    let seen = |s: &Status, agents: &mut BTreeMap<String, AgentRow>| {
        let a = agents.entry(s.agent.clone()).or_insert_with(|| AgentRow {
            id: s.agent.clone(),
            ..Default::default()
        });
        if a.last_heartbeat.is_none_or(|t| s.updated >= t) {
            a.last_heartbeat = Some(s.updated);
            if !s.server.is_empty() {
                a.server = s.server.clone();
            }
        }
    };
    for s in statuses {
        seen(s, &mut agents);
    }
    for j in jobs {
        let Some(holder) = &j.holder else { continue };
        if let Some(s) = &j.status {
            seen(s, &mut agents);
        }
        let a = agents.entry(holder.clone()).or_insert_with(|| AgentRow {
            id: holder.clone(),
            ..Default::default()
        });
        if j.state == JobState::Done {
            a.done += 1;
        } else if j.state.is_active() {
            a.job = Some(j.id.clone());
            a.phase = j.phase;
        }
    }
    agents.into_values().collect()
}

fn read_images(spool: &LocalSpool) -> Vec<ImageRow> {
    let names = spool.list(IMAGES).unwrap_or_else(|e| {
        tracing::warn!("listing {IMAGES}/: {e}");
        vec![]
    });
    let signers = master_signers(spool).map_err(|e| e.to_string());
    let mut rows: Vec<ImageRow> = names
        .iter()
        .filter_map(|id| {
            let dir = image_dir(id);
            let path = format!("{dir}/{PUBLISHED}");
            let bytes = spool.read_opt(&path).ok()??;
            let p = Published::parse(&String::from_utf8_lossy(&bytes))
                .map_err(|e| tracing::warn!("skipping {path}: {e}"))
                .ok()?;
            let manifest = spool
                .read_opt(&format!("{dir}/{MANIFEST}"))
                .ok()
                .flatten()
                .and_then(|b| ImageManifest::parse(&String::from_utf8_lossy(&b)).ok());
            let data_bytes = manifest.as_ref().map(|m| m.data_bytes());
            let (provenance, phases) = manifest
                .map(|m| (m.provenance, m.phases))
                .unwrap_or_default();
            let signature = match (&signers, read_image(spool, id)) {
                (Ok(s), Ok(Some(record))) => record.check_signature(s),
                (Err(why), _) => SignatureCheck::Unchecked(why.clone()),
                (_, Ok(None)) => SignatureCheck::Missing,
                (_, Err(e)) => SignatureCheck::Invalid(e.to_string()),
            };
            Some(ImageRow {
                job: p.job,
                agent: p.agent,
                published: p.published,
                image_size: p.image_size,
                disk_size: p.disk_size,
                data_bytes,
                image_blake3: p.image_blake3,
                provenance,
                phases,
                signature,
            })
        })
        .collect();
    // Newest first: the operator looks for what just finished.
    rows.sort_by(|a, b| b.published.cmp(&a.published).then(a.job.cmp(&b.job)));
    rows
}

impl Detail {
    /// Reads a job's spec and the tail of its log: `logs/<id>.log` while it
    /// runs, the published `images/<id>/job.log` once it is done.
    pub fn load(spool: &LocalSpool, id: &str) -> Detail {
        let spec = read_job_spec(spool, id)
            .map(|(_, spec)| spec)
            .map_err(|e| e.to_string());
        let mut log_source = None;
        let mut log = Vec::new();
        for path in [log_path(id), format!("{}/{JOB_LOG}", image_dir(id))] {
            match read_tail(spool, &path) {
                Ok(Some(lines)) => {
                    log_source = Some(path);
                    log = lines;
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    log_source = Some(path.clone());
                    log = vec![format!("cannot read {path}: {e}")];
                    break;
                }
            }
        }
        Detail {
            id: id.to_string(),
            spec,
            log_source,
            log,
        }
    }
}

/// The last lines of a file, `None` if it does not exist.
fn read_tail(spool: &LocalSpool, rel: &str) -> std::io::Result<Option<Vec<String>>> {
    // Logs are agent-written: opened beneath the spool, never through a
    // symlink, and only if they are regular files.
    let mut f = match spool.open_file(rel) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(LOG_TAIL_BYTES).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| printable_log_line(l).into_owned())
        .collect();
    if start > 0 && !lines.is_empty() {
        // The first line was cut in the middle.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    Ok(Some(lines.split_off(skip)))
}
