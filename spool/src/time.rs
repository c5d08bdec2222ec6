//! Timestamps as whole seconds since the epoch, written as RFC 3339 in files.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }
    pub fn from_system(t: SystemTime) -> Self {
        Timestamp(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0)
    }
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_secs()))
    }
    /// Seconds from `self` until `later`, negative when `later` is earlier.
    pub fn secs_until(self, later: Timestamp) -> i64 {
        later.0 as i64 - self.0 as i64
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.to_system()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 time like \"2026-01-31T12:00:00Z\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                humantime::parse_rfc3339_weak(v)
                    .map(Timestamp::from_system)
                    .map_err(|e| E::custom(format!("{v:?}: {e}")))
            }
        }
        d.deserialize_str(V)
    }
}

/// Formats a signed number of seconds compactly: `4m05s`, `-12s`, `2h03m`.
pub fn format_secs(secs: i64) -> String {
    let sign = if secs < 0 { "-" } else { "" };
    let s = secs.unsigned_abs();
    if s >= 3600 {
        format!("{sign}{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{sign}{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{sign}{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let t = Timestamp(1_800_000_000);
        let text = t.to_string();
        assert_eq!(text, "2027-01-15T08:00:00Z");
        #[derive(Serialize, Deserialize)]
        struct W {
            t: Timestamp,
        }
        let back: W = toml::from_str(&toml::to_string(&W { t }).unwrap()).unwrap();
        assert_eq!(back.t, t);
    }

    #[test]
    fn formats_seconds() {
        assert_eq!(format_secs(245), "4m05s");
        assert_eq!(format_secs(-12), "-12s");
        assert_eq!(format_secs(7380), "2h03m");
    }
}
