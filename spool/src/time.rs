//! Timestamps as whole seconds since the epoch, written as RFC 3339 in files.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whole seconds since the epoch, up to [`Timestamp::MAX`]: arithmetic
/// saturates there and parsing refuses anything later, so every timestamp
/// can be written as RFC 3339. A value built past it by hand counts as `MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
    pub const MAX: Timestamp = Timestamp(253_402_300_799);

    /// `secs` after the epoch, or [`Timestamp::MAX`] if that is later.
    pub const fn from_secs(secs: u64) -> Self {
        if secs > Self::MAX.0 {
            Self::MAX
        } else {
            Timestamp(secs)
        }
    }
    /// Seconds since the epoch, at most `MAX`'s.
    pub const fn as_secs(self) -> u64 {
        Self::from_secs(self.0).0
    }
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }
    /// `t` in whole seconds: the epoch if earlier, `MAX` if later.
    pub fn from_system(t: SystemTime) -> Self {
        Self::from_secs(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.as_secs())
    }
    /// `d` later, or [`Timestamp::MAX`] if that is later.
    pub fn plus(self, d: Duration) -> Self {
        Self::from_secs(self.as_secs().saturating_add(d.as_secs()))
    }
    /// Seconds from `self` until `later`, negative when `later` is earlier.
    pub fn secs_until(self, later: Timestamp) -> i64 {
        // Both fit an i64 many times over: MAX is below 2^38.
        later.as_secs() as i64 - self.as_secs() as i64
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
                parse_timestamp(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses an RFC 3339 time, at most [`Timestamp::MAX`].
pub fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    let t = humantime::parse_rfc3339_weak(text).map_err(|e| format!("{text:?}: {e}"))?;
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if secs > Timestamp::MAX.0 {
        return Err(format!("{text:?} is later than {}", Timestamp::MAX));
    }
    Ok(Timestamp(secs))
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

    #[test]
    fn the_last_second_of_9999_is_the_latest() {
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59Z");
        assert_eq!(
            parse_timestamp("9999-12-31T23:59:59Z").unwrap(),
            Timestamp::MAX
        );
        for later in ["10000-01-01T00:00:00Z", "+10000-01-01T00:00:00Z"] {
            assert!(parse_timestamp(later).is_err(), "{later} accepted");
        }
    }

    #[test]
    fn arithmetic_saturates_at_the_latest_and_always_formats() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let near = Timestamp(Timestamp::MAX.0 - 60);
        assert_eq!(near.plus(week), Timestamp::MAX);
        assert_eq!(Timestamp::MAX.plus(Duration::MAX), Timestamp::MAX);
        assert_eq!(Timestamp(0).plus(Duration::MAX), Timestamp::MAX);
        assert_eq!(Timestamp::from_secs(u64::MAX), Timestamp::MAX);
        // Built by hand past the ceiling: it counts as the ceiling.
        let wild = Timestamp(u64::MAX);
        assert_eq!(wild.to_string(), "9999-12-31T23:59:59Z");
        assert_eq!(wild.secs_until(Timestamp(0)), -(Timestamp::MAX.0 as i64));
        assert_eq!(Timestamp(0).secs_until(wild), Timestamp::MAX.0 as i64);
        assert_eq!(wild.plus(week), Timestamp::MAX);
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(Timestamp::from_system(far), Timestamp::MAX);
    }
}
