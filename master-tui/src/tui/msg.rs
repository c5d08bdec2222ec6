//! Everything that can happen to the console becomes a [`Msg`]; what `update`
//! wants done outside itself (reading or changing the spool) comes back as an
//! [`Effect`].

use crossterm::event::{Event, KeyEvent, KeyEventKind};
use kiln_spool::master::ReapReport;
use kiln_spool::time::Timestamp;

use super::spool_state::{Detail, SpoolState};
use super::spool_write::Change;

#[derive(Debug)]
pub enum Msg {
    /// A key the operator pressed.
    Key(KeyEvent),
    /// Text pasted into the terminal (a job file's path, a filter).
    Paste(String),
    /// SIGINT, SIGTERM or SIGHUP: stop, restoring the terminal.
    Terminate,
    /// The terminal changed size; the next draw adapts.
    Resize,
    /// The clock moved on.
    Tick(Timestamp),
    /// A fresh read of the spool.
    Spool(Box<SpoolState>),
    /// Reading the spool failed.
    SpoolError(String),
    /// The selected job's spec and log.
    Detail(Box<Detail>),
    /// One pass of the background reaper and publisher.
    Reaped(Result<ReapReport, String>),
    /// A [`Change`] was made (what it did) or refused (why).
    Changed(Result<String, String>),
    /// Adding the job file typed as `input` ended: the new job's id and
    /// priority, or why not.
    Added {
        input: String,
        result: Result<(String, u32), String>,
    },
}

impl Msg {
    /// The message for a terminal event, if it matters to the console.
    pub fn from_event(ev: Event) -> Option<Msg> {
        match ev {
            Event::Key(k) if k.kind != KeyEventKind::Release => Some(Msg::Key(k)),
            Event::Resize(..) => Some(Msg::Resize),
            Event::Paste(text) => Some(Msg::Paste(text)),
            _ => None,
        }
    }
}

/// Work `update` asks the runtime to do off the UI thread: reads go to the
/// spool reader, changes to the spool writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Read the spool again.
    Refresh,
    /// Read a job's spec and log.
    LoadDetail(String),
    /// Change the spool under the masters' lock.
    Change(Change),
}
