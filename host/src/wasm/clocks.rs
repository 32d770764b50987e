//! The guest's clocks: what timing needs and no more. Both read the host's
//! clocks rounded down to `RESOLUTION`, so guest code cannot time the host
//! (or other guests) to the nanosecond; the monotonic clock starts at zero
//! when the guest starts, so it says nothing about the host's uptime.

use std::time::{Duration, Instant, SystemTime};

use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// The finest step either clock takes (the resolution browsers give scripts).
pub const RESOLUTION: Duration = Duration::from_millis(1);

fn coarse(nanos: u128) -> u64 {
    let step = RESOLUTION.as_nanos();
    u64::try_from(nanos / step * step).unwrap_or(u64::MAX)
}

/// Unix time, to the millisecond (dates and logging keep working).
pub struct CoarseWallClock;

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        RESOLUTION
    }

    fn now(&self) -> Duration {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_nanos(coarse(since_epoch.as_nanos()))
    }
}

/// Time since the guest started, to the millisecond.
pub struct CoarseMonotonicClock {
    started: Instant,
}

impl Default for CoarseMonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl CoarseMonotonicClock {
    pub fn new() -> Self {
        CoarseMonotonicClock {
            started: Instant::now(),
        }
    }
}

impl HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        coarse(RESOLUTION.as_nanos())
    }

    fn now(&self) -> u64 {
        coarse(self.started.elapsed().as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_step_by_the_resolution() {
        let step = RESOLUTION.as_nanos();
        let wall = CoarseWallClock.now().as_nanos();
        assert_eq!(wall % step, 0);
        assert!(wall > 1_700_000_000 * 1_000_000_000, "wall clock is Unix time");
        let mono = CoarseMonotonicClock::new();
        std::thread::sleep(Duration::from_millis(3));
        let later = mono.now();
        assert_eq!(u128::from(later) % step, 0);
        assert!(
            (3_000_000..10_000_000_000).contains(&later),
            "counts from the guest's start: {later}"
        );
        assert_eq!(mono.resolution(), 1_000_000);
    }
}
