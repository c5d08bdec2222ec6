//! What the engine tells its caller while it works: phases, progress and
//! messages. The CLI draws them; `kiln-agent run` turns them into heartbeats.

use std::time::{Duration, Instant};

use kiln_spool::units::human_bytes;

pub use kiln_spool::status::Phase;

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

/// One console line per byte-counting phase, at most every `every`:
/// `payloads 412.0 MiB / 731.0 MiB, 38.0 MiB/s`. The throughput is the
/// phase's average since its first report. Time is a parameter, so the
/// lines are tested without waiting.
pub struct ProgressLine {
    every: Duration,
    phase: Option<Phase>,
    started: Instant,
    last: Option<Instant>,
}

impl ProgressLine {
    pub fn new(every: Duration, now: Instant) -> Self {
        ProgressLine {
            every,
            phase: None,
            started: now,
            last: None,
        }
    }

    /// The line to print for `done` of `total` bytes of `phase`, if one is due.
    pub fn update(&mut self, phase: Phase, done: u64, total: u64, now: Instant) -> Option<String> {
        if self.phase != Some(phase) {
            self.phase = Some(phase);
            self.started = now;
            self.last = Some(now);
            return None;
        }
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if !due && done < total {
            return None;
        }
        if done >= total && self.last.is_none() {
            return None;
        }
        // The last line of a phase is printed once.
        self.last = if done >= total { None } else { Some(now) };
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 {
            format!("{}/s", human_bytes((done as f64 / secs) as u64))
        } else {
            "-".into()
        };
        Some(format!(
            "{phase} {} / {}, {rate}",
            human_bytes(done),
            human_bytes(total)
        ))
    }
}

/// Draws events for a person: an indicatif bar per phase on a terminal,
/// plain lines otherwise (a log file, a serial console).
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
    last_tenth: u64,
    /// When the phase started, for its throughput.
    started: Instant,
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
            started: Instant::now(),
        }
    }

    pub fn event(&mut self, e: &Event) {
        match &e.kind {
            EventKind::Started => {
                self.last_tenth = 0;
                self.started = Instant::now();
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
                        let of = if e.phase.counts_bytes() {
                            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                            format!(
                                "{} of {}, {}/s",
                                human_bytes(*done),
                                human_bytes(*total),
                                human_bytes((*done as f64 / secs) as u64)
                            )
                        } else {
                            format!("{done} of {total}")
                        };
                        eprintln!("{}: {}% ({of})", e.phase, tenth * 10);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_is_due_every_interval_and_at_the_end() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut line = ProgressLine::new(Duration::from_secs(5), t0);
        let mib = 1u64 << 20;
        assert_eq!(line.update(Phase::Payloads, 0, 731 * mib, t0), None);
        assert_eq!(
            line.update(Phase::Payloads, 38 * mib, 731 * mib, t0 + s),
            None
        );
        assert_eq!(
            line.update(Phase::Payloads, 190 * mib, 731 * mib, t0 + 5 * s)
                .as_deref(),
            Some("payloads 190.0 MiB / 731.0 MiB, 38.0 MiB/s")
        );
        assert_eq!(
            line.update(Phase::Payloads, 200 * mib, 731 * mib, t0 + 6 * s),
            None
        );
        assert_eq!(
            line.update(Phase::Payloads, 731 * mib, 731 * mib, t0 + 7 * s)
                .as_deref(),
            Some("payloads 731.0 MiB / 731.0 MiB, 104.4 MiB/s")
        );
        assert_eq!(
            line.update(Phase::Payloads, 731 * mib, 731 * mib, t0 + 8 * s),
            None
        );
        // A new phase starts its own clock.
        assert_eq!(line.update(Phase::Capture, 0, 10 * mib, t0 + 9 * s), None);
        assert_eq!(
            line.update(Phase::Capture, 10 * mib, 10 * mib, t0 + 11 * s)
                .as_deref(),
            Some("capture 10.0 MiB / 10.0 MiB, 5.0 MiB/s")
        );
    }
}
