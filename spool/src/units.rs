//! Human-written sizes (`64MiB`, `2GiB`), durations (`30m`, `1h 30m`) and
//! the bounded durations jobs and steps are given as time limits.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// Parses a byte count such as `64MiB`, `2GiB`, `512KiB`, `4096` or `1.5GiB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!(
                    "unknown unit {unit:?} in {text:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                )
            })?
    };
    if num.is_empty() {
        return Err(format!("{text:?} is not a size like \"64MiB\" or \"2GiB\""));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"64MiB\" or \"2GiB\""))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("{text:?} is too large"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Formats a byte count with the largest binary unit that divides it evenly,
/// so that `parse_bytes(format_bytes(n)) == n`.
pub fn format_bytes(n: u64) -> String {
    for (unit, mult) in &UNITS[..4] {
        if n >= *mult && n.is_multiple_of(*mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    format!("{n}B")
}

/// Formats a byte count approximately for people (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    for (unit, mult) in &UNITS[..4] {
        if n >= *mult {
            return format!("{:.1} {unit}", n as f64 / *mult as f64);
        }
    }
    format!("{n} B")
}

/// A partition size: a fixed byte count or the rest of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Rest,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(n) => f.write_str(&format_bytes(*n)),
            Size::Rest => f.write_str("rest"),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"64MiB\", \"2GiB\" or \"rest\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                if v == "rest" {
                    return Ok(Size::Rest);
                }
                parse_bytes(v).map(Size::Bytes).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `30m`, `2h`, `90s` or `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    pub fn from_secs(s: u64) -> Self {
        Span(Duration::from_secs(s))
    }
    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }
}

/// Parses a duration such as `30m` or `1h 30m`; zero is refused.
pub fn parse_span(text: &str) -> Result<Span, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"30m\" or \"2h\" ({e})"))?;
    if d.is_zero() {
        return Err(format!("{text:?} is zero; a time limit must be positive"));
    }
    Ok(Span(d))
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like \"30m\" or \"2h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                parse_span(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A job's or a step's time limit: from [`TimeLimit::MIN`] to
/// [`TimeLimit::MAX`]. Every deadline is a timestamp plus one of these, so the
/// bound keeps deadlines in a range a timestamp can hold and a lease can be
/// reaped within a week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeLimit(Duration);

/// Why a duration is not a time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeLimitError {
    #[error("is shorter than 1s, the shortest time limit")]
    TooShort,
    #[error("is longer than 7days, the longest time limit")]
    TooLong,
}

impl TimeLimit {
    /// One second: deadlines are counted in whole seconds.
    pub const MIN: TimeLimit = TimeLimit(Duration::from_secs(1));
    /// Seven days.
    pub const MAX: TimeLimit = TimeLimit(Duration::from_secs(7 * 24 * 60 * 60));

    /// `d` as a time limit, if it lies between [`TimeLimit::MIN`] and [`TimeLimit::MAX`].
    pub const fn new(d: Duration) -> Result<TimeLimit, TimeLimitError> {
        let (secs, max) = (d.as_secs(), Self::MAX.0.as_secs());
        if secs < Self::MIN.0.as_secs() {
            Err(TimeLimitError::TooShort)
        } else if secs > max || (secs == max && d.subsec_nanos() > 0) {
            Err(TimeLimitError::TooLong)
        } else {
            Ok(TimeLimit(d))
        }
    }

    pub const fn from_secs(secs: u64) -> Result<TimeLimit, TimeLimitError> {
        Self::new(Duration::from_secs(secs))
    }

    pub const fn as_duration(self) -> Duration {
        self.0
    }

    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

/// An hour, the job spec's default.
impl Default for TimeLimit {
    fn default() -> Self {
        TimeLimit(Duration::from_secs(60 * 60))
    }
}

/// Parses a time limit such as `30m` or `2h`: positive, at most 7 days.
pub fn parse_time_limit(text: &str) -> Result<TimeLimit, String> {
    let span = parse_span(text)?;
    TimeLimit::new(span.0).map_err(|e| format!("{text:?} {e}"))
}

impl fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for TimeLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TimeLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like \"30m\" or \"2h\", at most 7 days")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeLimit, E> {
                parse_time_limit(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_round_trip() {
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1gb").unwrap(), 1_000_000_000);
        assert!(parse_bytes("64XB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("0.5B").is_err());
        for n in [1, 512, 1 << 20, 3 << 29, (64 << 20) + 1] {
            assert_eq!(parse_bytes(&format_bytes(n)).unwrap(), n);
        }
    }

    #[test]
    fn spans_parse() {
        assert_eq!(parse_span("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_span("1h 30m").unwrap().as_secs(), 5400);
        assert!(parse_span("0s").unwrap_err().contains("zero"));
        assert!(parse_span("soon").is_err());
    }

    #[test]
    fn time_limits_are_bounded() {
        assert_eq!(parse_time_limit("45m").unwrap().as_secs(), 45 * 60);
        assert_eq!(parse_time_limit("7days").unwrap(), TimeLimit::MAX);
        assert_eq!(parse_time_limit("1s").unwrap(), TimeLimit::MIN);
        for long in ["7days 1s", "8d", "10000y"] {
            let e = parse_time_limit(long).unwrap_err();
            assert!(e.contains("longer than 7days"), "{long}: {e}");
        }
        assert!(parse_time_limit("500ms").unwrap_err().contains("shorter"));
        assert!(parse_time_limit("0s").unwrap_err().contains("zero"));
        assert_eq!(
            TimeLimit::new(TimeLimit::MAX.as_duration() + Duration::from_nanos(1)),
            Err(TimeLimitError::TooLong)
        );
        assert_eq!(TimeLimit::from_secs(0), Err(TimeLimitError::TooShort));
        assert_eq!(TimeLimit::default().as_secs(), 3600);
    }

    #[test]
    fn a_time_limit_round_trips_and_refuses_too_long_in_toml() {
        #[derive(Debug, Serialize, Deserialize)]
        struct W {
            time_limit: TimeLimit,
        }
        let w: W = toml::from_str("time_limit = \"1h 30m\"").unwrap();
        let back: W = toml::from_str(&toml::to_string(&w).unwrap()).unwrap();
        assert_eq!(back.time_limit, w.time_limit);
        let e = toml::from_str::<W>("time_limit = \"10000y\"").unwrap_err();
        assert!(e.to_string().contains("longer than 7days"), "{e}");
    }
}
