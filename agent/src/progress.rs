//! What the engine tells its caller while it works: phases, progress and
//! messages. The CLI draws them; `kiln-agent run` turns them into heartbeats.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Check,
    Partition,
    Mkfs,
    Mount,
    Payloads,
    Configure,
    Steps,
    Unmount,
    Capture,
    Verify,
}

impl Phase {
    /// The name used in status heartbeats and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Check => "check",
            Phase::Partition => "partition",
            Phase::Mkfs => "mkfs",
            Phase::Mount => "mount",
            Phase::Payloads => "payloads",
            Phase::Configure => "configure",
            Phase::Steps => "steps",
            Phase::Unmount => "unmount",
            Phase::Capture => "capture",
            Phase::Verify => "verify",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub phase: Phase,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Started,
    /// `done` of `total` bytes (or items) of the phase.
    Progress {
        done: u64,
        total: u64,
    },
    Message(String),
    Finished {
        seconds: f64,
    },
}

impl Event {
    /// Progress through the phase, 0.0 to 1.0, for a heartbeat.
    pub fn fraction(&self) -> Option<f32> {
        match self.kind {
            EventKind::Started => Some(0.0),
            EventKind::Progress { done, total } if total > 0 => {
                Some((done as f64 / total as f64).clamp(0.0, 1.0) as f32)
            }
            EventKind::Finished { .. } => Some(1.0),
            _ => None,
        }
    }
}

/// Sends progress events no more often than every `step` units, so a copy
/// loop can report on every buffer without flooding the caller.
pub(crate) struct Throttle {
    phase: Phase,
    total: u64,
    last: u64,
    step: u64,
}

impl Throttle {
    pub fn new(phase: Phase, total: u64) -> Self {
        Throttle {
            phase,
            total,
            last: 0,
            step: (total / 200).max(1 << 20),
        }
    }

    pub fn update(&mut self, done: u64, events: &mut dyn FnMut(&Event)) {
        if done >= self.last + self.step || (done == self.total && self.last != done) {
            self.last = done;
            events(&Event {
                phase: self.phase,
                kind: EventKind::Progress {
                    done,
                    total: self.total,
                },
            });
        }
    }
}

/// Draws events for a person: an indicatif bar per phase on a terminal,
/// plain lines otherwise (a log file, a serial console).
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
    last_tenth: u64,
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Reporter {
            bar: None,
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    pub fn event(&mut self, e: &Event) {
        match &e.kind {
            EventKind::Started => {
                self.last_tenth = 0;
                if self.tty {
                    let bar = indicatif::ProgressBar::new(0);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(e.phase.as_str());
                    self.bar = Some(bar);
                } else {
                    eprintln!("{}: started", e.phase);
                }
            }
            EventKind::Progress { done, total } => {
                if let Some(bar) = &self.bar {
                    bar.set_length(*total);
                    bar.set_position(*done);
                } else if *total > 0 {
                    let tenth = done * 10 / total;
                    if tenth > self.last_tenth {
                        self.last_tenth = tenth;
                        eprintln!(
                            "{}: {}% ({} of {})",
                            e.phase,
                            tenth * 10,
                            kiln_spool::units::human_bytes(*done),
                            kiln_spool::units::human_bytes(*total)
                        );
                    }
                }
            }
            EventKind::Message(m) => match &self.bar {
                Some(bar) => bar.println(format!("{}: {m}", e.phase)),
                None => eprintln!("{}: {m}", e.phase),
            },
            EventKind::Finished { seconds } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_with_message(format!("done in {seconds:.1}s"));
                } else {
                    eprintln!("{}: done in {seconds:.1}s", e.phase);
                }
            }
        }
    }
}
