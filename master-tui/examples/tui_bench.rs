//! Benchmark of the operator's console on a big spool: 10,000 jobs and 200
//! agents. Prints the time to read the spool, the time per frame at 160x48
//! and 80x24, the reaper's pass, and the console's peak memory.
//!
//! `cargo run --release -p kiln-master --example tui_bench [-- JOBS AGENTS]`
//!
//! The spool is built by this process, then measured by a fresh copy of it,
//! so the peak memory is the console's alone.

use std::path::Path;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kiln_master::tui::{update, view, App, Effect, Msg, SpoolState};
use kiln_spool::lease::Lease;
use kiln_spool::manifest::{DataRange, ImageManifest};
use kiln_spool::master::reap;
use kiln_spool::master::{init, write_job_list, HistoryRecord};
use kiln_spool::queue::{Entry, EntryState, JobList};
use kiln_spool::spool::{history_path, image_dir, job_path, lease_path, log_path, status_path};
use kiln_spool::status::{AgentState, Phase, Status};
use kiln_spool::time::Timestamp;
use kiln_spool::units::TimeLimit;
use kiln_spool::upload::{Published, MANIFEST, PUBLISHED};
use kiln_spool::LocalSpool;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const JOB: &str = r#"
[disk]
[[disk.partitions]]
label = "esp"
size = "512MiB"
kind = "esp"
fs = "vfat"
mount = "/boot/efi"
[[disk.partitions]]
label = "root"
size = "rest"
kind = "linux"
fs = "ext4"
mount = "/"
[[steps]]
name = "enable-ssh"
run = "systemctl enable ssh"
"#;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--measure") {
        return measure(Path::new(&args[1]));
    }
    let jobs: usize = args.first().map_or(Ok(10_000), |a| a.parse())?;
    let agents: usize = args.get(1).map_or(Ok(200), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    build(dir.path(), jobs, agents)?;
    println!(
        "spool: {jobs} jobs, {agents} agents, built in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let status = std::process::Command::new(std::env::current_exe()?)
        .arg("--measure")
        .arg(dir.path())
        .status()?;
    anyhow::ensure!(status.success(), "the measuring run failed: {status}");
    Ok(())
}

/// Builds a spool with `jobs` jobs: one leased per agent (a third of them
/// uploading), a tenth done with a published image, a few failed, invalid
/// and cancelled, the rest queued.
fn build(root: &Path, jobs: usize, agents: usize) -> anyhow::Result<()> {
    let spool = LocalSpool::new(root);
    init(&spool)?;
    let t0 = Timestamp::now().0 - 3600;
    let done = jobs / 10;
    let mut list = JobList::default();
    for i in 0..jobs {
        let id = format!("job-{i:05}");
        let text = format!("id = \"{id}\"\npriority = {}\n{JOB}", i % 1000);
        put(root, &job_path(&id), text.as_bytes())?;
        let entry = Entry {
            id: id.clone(),
            priority: (i % 1000) as u32,
            seq: 0,
            state: match i % 100 {
                97 => EntryState::Failed,
                98 => EntryState::Invalid,
                99 => EntryState::Cancelled,
                _ => EntryState::Queued,
            },
            attempts: 0,
            max_attempts: 3,
            time_limit: TimeLimit::default(),
            submitted: Timestamp(t0 + (i as u64 % 3600)),
            blake3: blake3::hash(text.as_bytes()).to_hex().to_string(),
            message: String::new(),
            lease: None,
        };
        if i >= jobs - done {
            let record = HistoryRecord {
                entry,
                finished: Timestamp(t0 + 3000),
                agent: format!("agent-{:03}", i % agents.max(1)),
                token: "1-000000000000000000000000".into(),
                status: None,
                deployment: None,
            };
            put(root, &history_path(&id), record.to_toml().as_bytes())?;
            publish(root, &id, &record.agent, record.finished)?;
        } else {
            list.push(entry);
        }
    }
    write_job_list(&spool, &list)?;
    // Each agent holds one of the queued jobs and heartbeats on it.
    let queued: Vec<String> = list
        .jobs
        .iter()
        .filter(|e| e.state == EntryState::Queued)
        .map(|e| e.id.clone())
        .collect();
    for (a, id) in queued.iter().take(agents).enumerate() {
        let agent = format!("agent-{a:03}");
        let lease = Lease::new(id, &agent, Timestamp(t0 + 3000), TimeLimit::default(), 1);
        put(root, &lease_path(id), lease.to_toml().as_bytes())?;
        let status = Status {
            job: id.clone(),
            agent,
            token: lease.token.clone(),
            server: format!("10.0.{}.{}:22", a / 250, a % 250),
            state: if a % 3 == 0 {
                AgentState::Uploading
            } else {
                AgentState::Building
            },
            phase: if a % 3 == 0 {
                Phase::Upload
            } else {
                Phase::Payloads
            },
            progress: (a % 10) as f32 / 10.0,
            bytes_done: 0,
            bytes_total: 0,
            message: String::new(),
            started: lease.acquired,
            updated: Timestamp(t0 + 3500),
        };
        put(root, &status_path(id), status.to_toml().as_bytes())?;
        let log: String = (0..200).map(|n| format!("{id}: step {n}\n")).collect();
        put(root, &log_path(id), log.as_bytes())?;
    }
    Ok(())
}

fn publish(root: &Path, id: &str, agent: &str, when: Timestamp) -> anyhow::Result<()> {
    let dir = image_dir(id);
    std::fs::create_dir_all(root.join(&dir))?;
    let hash = blake3::hash(id.as_bytes()).to_hex().to_string();
    let manifest = ImageManifest {
        format: "raw.zst".into(),
        job: id.into(),
        job_blake3: String::new(),
        agent: agent.into(),
        disk_size: 8 << 30,
        block_size: 4096,
        bytes_read: 2 << 30,
        image_size: 700 << 20,
        image_blake3: hash.clone(),
        payloads: vec![],
        started: when,
        finished: when,
        phases: vec![],
        ranges: (0..32)
            .map(|r| DataRange {
                offset: r << 28,
                length: 64 << 20,
                blake3: hash.clone(),
            })
            .collect(),
        generalized: Vec::new(),
        provenance: None,
    };
    put(
        root,
        &format!("{dir}/{MANIFEST}"),
        manifest.to_toml().as_bytes(),
    )?;
    let published = Published {
        job: id.into(),
        token: "1-000000000000000000000000".into(),
        agent: agent.into(),
        published: when,
        image_size: manifest.image_size,
        image_blake3: hash,
        disk_size: manifest.disk_size,
    };
    put(
        root,
        &format!("{dir}/{PUBLISHED}"),
        published.to_toml().as_bytes(),
    )?;
    Ok(())
}

/// Writes a file without the spool's fsyncs: building the fixture is not
/// what is measured.
fn put(root: &Path, rel: &str, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(root.join(rel), data)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(root: &Path) -> anyhow::Result<()> {
    let spool = LocalSpool::new(root);
    let mut app = App::new(root, Timestamp::now());
    app.color = true;

    // Reading the spool, as the reader thread does on every change.
    let mut loads = Vec::new();
    let mut state = None;
    for _ in 0..5 {
        let t = Instant::now();
        state = Some(SpoolState::load(&spool, app.now)?);
        loads.push(t.elapsed());
    }
    let state = state.expect("loaded");
    let (jobs, agents, images) = (state.jobs.len(), state.agents.len(), state.images.len());
    let mut views = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        kiln_spool::master::job_views(&spool, app.now)?;
        views.push(t.elapsed());
    }
    views.sort();
    let t = Instant::now();
    let effects = update(&mut app, Msg::Spool(Box::new(state)));
    let apply = t.elapsed();
    for e in effects {
        if let Effect::LoadDetail(id) = e {
            update(
                &mut app,
                Msg::Detail(Box::new(kiln_master::tui::Detail::load(&spool, &id))),
            );
        }
    }
    loads.sort();
    println!(
        "load: {jobs} job views, {agents} agents, {images} images; median {:.1} ms (min {:.1}, max {:.1}); applying it {:.1} ms",
        ms(loads[loads.len() / 2]),
        ms(loads[0]),
        ms(loads[loads.len() - 1]),
        ms(apply)
    );
    println!(
        "  of which the protocol's job_views (jobs.toml, leases, status, history): median {:.1} ms",
        ms(views[1])
    );

    for (w, h) in [(160u16, 48u16), (80, 24)] {
        let mut terminal = Terminal::new(TestBackend::new(w, h))?;
        let frames = 300;
        let mut times = Vec::with_capacity(frames);
        for i in 0..frames {
            // Walk the list, across the pane boundary, so frames differ.
            let code = if i % 50 < 40 {
                KeyCode::Down
            } else {
                KeyCode::PageDown
            };
            update(&mut app, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
            let t = Instant::now();
            terminal.draw(|f| view(&app, f))?;
            times.push(t.elapsed());
        }
        times.sort();
        let mean = times.iter().sum::<Duration>() / frames as u32;
        println!(
            "frame {w}x{h}: mean {:.2} ms, median {:.2} ms, p99 {:.2} ms over {frames} frames",
            ms(mean),
            ms(times[frames / 2]),
            ms(times[frames * 99 / 100])
        );
    }

    let t = Instant::now();
    let report = {
        let _lock = spool.lock()?;
        reap(&spool, Timestamp::now())?
    };
    println!(
        "reaper pass: {:.1} ms ({} lines of report)",
        ms(t.elapsed()),
        report.lines().len()
    );

    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: unknown");
    let kib: f64 = hwm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN);
    println!("peak memory (VmHWM): {:.1} MiB", kib / 1024.0);
    println!("targets: under 16 ms per frame and under 100 MiB of memory");
    Ok(())
}
