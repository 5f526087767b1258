//! The restart policy: whether a worker whose process ended is started again, and after how
//! long. A profile's `restart`, `restart_backoff`, `max_restarts` and `restart_window` keys,
//! and the per-worker bookkeeping that turns them into a decision. Nothing here runs a
//! process; the runtime asks [`Restarts::decide`] when a process has ended.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use registry_core::{de, SpawnRequest};
use serde::Deserialize;

/// When a worker's process that ended is started again (a profile's or a spawn request's
/// `restart` key): the core's [`Restart`](registry_core::Restart).
pub use registry_core::Restart;

/// The delay before a restart (a profile's `restart_backoff` table): exponential with full
/// jitter. The `n`-th restart in a row (from 0) waits a random time in
/// `0..=min(cap, base × 2ⁿ)`; once a run stayed up `reset_after`, `n` starts again at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The bound of the first delay. Default 500 ms.
    #[serde(deserialize_with = "de::duration")]
    pub base: Duration,
    /// The largest bound. Default 60 s.
    #[serde(deserialize_with = "de::duration")]
    pub cap: Duration,
    /// A run that lasted this long resets the delay to its first bound. Default 30 s.
    #[serde(deserialize_with = "de::duration")]
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The largest delay before the `n`-th restart in a row (from 0): `min(cap, base × 2ⁿ)`.
    pub fn bound(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// Most restarts the config may allow within one window: it bounds the memory of the window.
/// The core's [`limits::MAX_RESTARTS`](registry_core::limits::MAX_RESTARTS).
pub const MAX_RESTARTS_LIMIT: u32 = registry_core::limits::MAX_RESTARTS;

/// A profile's restart settings, as read from its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub restart: Restart,
    /// The delay before each restart.
    pub backoff: Backoff,
    /// Most restarts within `window`; the exit after them makes the worker `failed` with
    /// reason `crash_loop`. Default 10, at most [`MAX_RESTARTS_LIMIT`].
    pub max_restarts: u32,
    /// The window `max_restarts` counts in. Default 10 min.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restart: Restart::Never,
            backoff: Backoff::default(),
            max_restarts: 10,
            window: Duration::from_secs(600),
        }
    }
}

impl RestartPolicy {
    /// This policy with what a spawn request gives in its place: each of `restart`,
    /// `restart_backoff`'s keys, `max_restarts` and `restart_window` that the request sets
    /// wins. The request's bounds were checked by [`SpawnRequest::validate`].
    pub fn with_request(mut self, request: &SpawnRequest) -> Self {
        if let Some(restart) = request.restart {
            self.restart = restart;
        }
        if let Some(b) = request.restart_backoff {
            self.backoff.base = b.base.unwrap_or(self.backoff.base);
            self.backoff.cap = b.cap.unwrap_or(self.backoff.cap);
            self.backoff.reset_after = b.reset_after.unwrap_or(self.backoff.reset_after);
        }
        self.max_restarts = request.max_restarts.unwrap_or(self.max_restarts);
        self.window = request.restart_window.unwrap_or(self.window);
        self
    }
}

/// How a worker's process ended, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Exited with code 0.
    Success,
    /// Exited with another code, or a signal nobody asked for ended it.
    Failure,
}

/// What to do with a worker whose process ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// End the worker as the process ended.
    End,
    /// Start it again after this delay.
    Restart(Duration),
    /// It restarted `max_restarts` times within the window already: end it as a crash loop.
    CrashLoop,
}

/// One worker's restart bookkeeping.
#[derive(Debug)]
pub(crate) struct Restarts {
    policy: RestartPolicy,
    /// Restarts in a row since the last run that lasted `reset_after`: the backoff exponent.
    in_a_row: u32,
    /// When the restarts within the window were decided, oldest first; at most
    /// `max_restarts` entries.
    recent: VecDeque<Instant>,
    random: RandomState,
}

impl Restarts {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Restarts {
            policy,
            in_a_row: 0,
            recent: VecDeque::new(),
            random: RandomState::new(),
        }
    }

    /// Decides about a process that ended by itself after running for `ran`.
    pub(crate) fn decide(&mut self, ending: Ending, ran: Duration, now: Instant) -> Decision {
        let wanted = match self.policy.restart {
            Restart::Never => false,
            Restart::OnFailure => ending == Ending::Failure,
            Restart::Always => true,
        };
        if !wanted {
            return Decision::End;
        }
        while self
            .recent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= self.policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_restarts as usize {
            return Decision::CrashLoop;
        }
        if ran >= self.policy.backoff.reset_after {
            self.in_a_row = 0;
        }
        let bound = self.policy.backoff.bound(self.in_a_row);
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.recent.push_back(now);
        Decision::Restart(self.jitter(bound))
    }

    /// A random duration in `0..=bound` (full jitter).
    fn jitter(&self, bound: Duration) -> Duration {
        let mut hasher = self.random.build_hasher();
        hasher.write_u128(Instant::now().elapsed().as_nanos());
        hasher.write_usize(self.recent.len());
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(hasher.finish() % nanos.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(restart: Restart) -> RestartPolicy {
        RestartPolicy {
            restart,
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_millis(1000),
                reset_after: Duration::from_secs(30),
            },
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn delays_stay_within_bounds_that_double_up_to_the_cap() {
        let mut r = Restarts::new(policy(Restart::OnFailure));
        let now = Instant::now();
        let bounds = [100, 200, 400, 800, 1000];
        for bound in bounds {
            match r.decide(Ending::Failure, Duration::ZERO, now) {
                Decision::Restart(d) => assert!(d <= Duration::from_millis(bound), "{d:?}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            r.decide(Ending::Failure, Duration::ZERO, now),
            Decision::CrashLoop
        );
    }

    #[test]
    fn a_long_run_resets_the_delay_and_the_window_forgets_old_restarts() {
        let mut r = Restarts::new(policy(Restart::Always));
        let start = Instant::now();
        for _ in 0..5 {
            assert!(matches!(
                r.decide(Ending::Success, Duration::ZERO, start),
                Decision::Restart(_)
            ));
        }
        // A minute later the window is empty again, and a run of 30 s resets the exponent.
        let later = start + Duration::from_secs(61);
        match r.decide(Ending::Success, Duration::from_secs(30), later) {
            Decision::Restart(d) => assert!(d <= Duration::from_millis(100), "{d:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn never_and_on_failure_leave_what_they_should_alone() {
        let now = Instant::now();
        let mut never = Restarts::new(policy(Restart::Never));
        assert_eq!(
            never.decide(Ending::Failure, Duration::ZERO, now),
            Decision::End
        );
        let mut on_failure = Restarts::new(policy(Restart::OnFailure));
        assert_eq!(
            on_failure.decide(Ending::Success, Duration::ZERO, now),
            Decision::End
        );
    }

    #[test]
    fn bounds_do_not_overflow() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::MAX,
            reset_after: Duration::ZERO,
        };
        assert!(b.bound(200) >= b.bound(31));
    }
}
