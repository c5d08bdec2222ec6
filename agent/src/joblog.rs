//! The job log: every command, step output line and error of a build, with
//! the time since the build started. It is the full record; the caller gets
//! a one-line reason.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Context, Result};

/// A cheap-to-clone handle on the job log file. Writes never fail the build:
/// a log line that cannot be written is reported on stderr.
#[derive(Clone)]
pub struct JobLog {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    file: Option<File>,
    path: PathBuf,
    started: Instant,
}

impl JobLog {
    /// Creates (truncates) the log file.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).ctx(|| format!("creating job log {}", path.display()))?;
        Ok(JobLog {
            inner: Arc::new(Mutex::new(Inner {
                file: Some(file),
                path: path.to_path_buf(),
                started: Instant::now(),
            })),
        })
    }

    /// A log that keeps nothing (for captures run on their own).
    pub fn discard() -> Self {
        JobLog {
            inner: Arc::new(Mutex::new(Inner {
                file: None,
                path: PathBuf::new(),
                started: Instant::now(),
            })),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    pub fn line(&self, text: &str) {
        let mut inner = self.lock();
        let t = inner.started.elapsed().as_secs_f64();
        let path = inner.path.clone();
        if let Some(f) = inner.file.as_mut() {
            let mut buf = String::new();
            for l in text.lines() {
                buf.push_str(&format!("[{t:9.3}] {l}\n"));
            }
            if let Err(e) = f.write_all(buf.as_bytes()) {
                eprintln!("kiln-agent: writing job log {}: {e}", path.display());
            }
        }
    }

    pub fn sync(&self) {
        if let Some(f) = self.lock().file.as_mut() {
            let _ = f.sync_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
