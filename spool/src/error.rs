//! The error of every spool operation: what was being done, on which file.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {problem}")]
    Corrupt { path: String, problem: String },
}

pub type Result<T, E = SpoolError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| SpoolError::Io {
            what: what(),
            source,
        })
    }
}
