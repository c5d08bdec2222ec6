//! The engine's error type. `Input` means nothing was written: the job, a
//! payload or the disk was unfit. Everything else happened while working.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input found before the disk was touched.
    #[error("{0}")]
    Input(String),
    /// An I/O operation failed; `what` names it.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A phase failed for a reason that is not an I/O error (a step's exit
    /// status, a refused payload entry, a corrupt image).
    #[error("{0}")]
    Failed(String),
    /// The caller raised the abort flag.
    #[error("aborted")]
    Aborted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn is_input(&self) -> bool {
        matches!(self, Error::Input(_))
    }

    /// The error and its sources on one line: `opening /dev/sda: Permission denied`.
    pub fn one_line(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s.replace('\n', " ")
    }
}

/// Names what an I/O operation was doing when it failed.
pub(crate) trait Context<T> {
    fn ctx<F: FnOnce() -> String>(self, what: F) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, what: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, what: F) -> Result<T> {
        self.map_err(|e| Error::Io {
            what: what(),
            source: io::Error::from(e),
        })
    }
}

/// Returns `Error::Aborted` once the caller has raised the flag.
pub(crate) fn check_abort(abort: &std::sync::atomic::AtomicBool) -> Result<()> {
    if abort.load(std::sync::atomic::Ordering::Relaxed) {
        Err(Error::Aborted)
    } else {
        Ok(())
    }
}
