//! Polling with a deadline instead of sleeping: `wait_until(timeout, what,
//! cond)` checks `cond` until it yields a value or the time is up.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The first pause between checks; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Calls `cond` until it returns `Ok(Some(v))` and returns `v`; fails when
/// `cond` fails or after `timeout`, naming `what` was awaited.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("timed out after {elapsed:.1?} waiting for {what}");
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// [`wait_until`] for a plain condition.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_until(timeout, what, || Ok(cond().then_some(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_and_times_out_naming_what() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "the third call", || {
            n += 1;
            Ok((n == 3).then_some(n))
        })
        .unwrap();
        assert_eq!(v, 3);

        let start = Instant::now();
        let err = wait_for(Duration::from_millis(100), "never", || false).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(err.to_string().contains("waiting for never"), "{err}");

        let err = wait_until::<()>(Duration::from_secs(5), "x", || bail!("broken")).unwrap_err();
        assert_eq!(err.to_string(), "broken");
    }
}
