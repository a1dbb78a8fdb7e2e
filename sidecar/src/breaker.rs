//! Whether the session store is down: a circuit breaker over recent store call outcomes.
//!
//! failurePolicy (Open: admit without the store) is for a store that is *down*, not for one
//! that was slow once. A burst of opens makes Redis slow exactly when every viewer presses play;
//! treating each slow call as an outage would admit them all without any count. So:
//! - a refused or lost connection (or the server saying it cannot serve: LOADING, CLUSTERDOWN...)
//!   means down at once: the store could not be asked at all;
//! - timeouts mean down only when they repeat ([`BreakerConfig::timeouts_to_open`] since the last
//!   answer) *and* nothing answered for [`BreakerConfig::quiet_to_open_ms`]: a slow store still
//!   answers some calls, a stopped one answers none;
//! - any answer (even a wrong one: the server is there) closes the breaker.
//!
//! Pure state machine: the caller passes "now", so it is tested with a hand-moved clock.

/// How a store call ended, as far as the breaker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The store answered (whatever it said).
    Answered,
    /// The call timed out: the store may be slow or stopped.
    TimedOut,
    /// The connection was refused or lost, or the server said it cannot serve now.
    Unreachable,
}

/// The breaker's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Timeouts since the last answer before the store may be judged down.
    pub timeouts_to_open: u32,
    /// Milliseconds without any answer before timeouts may open the breaker.
    pub quiet_to_open_ms: i64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            timeouts_to_open: 3,
            quiet_to_open_ms: 2_000,
        }
    }
}

/// The breaker state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    config: BreakerConfig,
    open: bool,
    timeouts: u32,
    /// When the store last answered (ms), or when the breaker was made.
    last_answer_ms: i64,
}

impl Breaker {
    /// A closed breaker (the store is presumed up) at `now_ms`.
    pub fn new(config: BreakerConfig, now_ms: i64) -> Self {
        Self {
            config,
            open: false,
            timeouts: 0,
            last_answer_ms: now_ms,
        }
    }

    /// Records a call's outcome at `now_ms`; returns whether the store is judged down now.
    pub fn record(&mut self, outcome: Outcome, now_ms: i64) -> bool {
        match outcome {
            Outcome::Answered => {
                self.open = false;
                self.timeouts = 0;
                self.last_answer_ms = self.last_answer_ms.max(now_ms);
            }
            Outcome::Unreachable => self.open = true,
            Outcome::TimedOut => {
                self.timeouts = self.timeouts.saturating_add(1);
                if self.timeouts >= self.config.timeouts_to_open
                    && now_ms - self.last_answer_ms >= self.config.quiet_to_open_ms
                {
                    self.open = true;
                }
            }
        }
        self.open
    }

    /// Whether the store is judged down (failurePolicy applies, readiness fails).
    pub fn is_open(&self) -> bool {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default(), 0)
    }

    #[test]
    fn one_slow_call_is_not_an_outage() {
        let mut b = breaker();
        assert!(!b.record(Outcome::TimedOut, 5_000));
        assert!(!b.is_open());
    }

    #[test]
    fn a_slow_store_that_still_answers_stays_closed() {
        let mut b = breaker();
        b.record(Outcome::Answered, 10_000);
        // A burst: many timeouts, but answers keep arriving between them.
        for t in 0..100 {
            let now = 10_000 + t * 50;
            assert!(!b.record(Outcome::TimedOut, now));
            assert!(!b.record(Outcome::TimedOut, now + 10));
            assert!(!b.record(Outcome::TimedOut, now + 20));
            assert!(!b.record(Outcome::TimedOut, now + 30));
            b.record(Outcome::Answered, now + 40);
        }
        assert!(!b.is_open());
    }

    #[test]
    fn many_timeouts_at_once_after_a_recent_answer_stay_closed() {
        let mut b = breaker();
        b.record(Outcome::Answered, 1_000);
        for _ in 0..400 {
            assert!(!b.record(Outcome::TimedOut, 1_500));
        }
    }

    #[test]
    fn repeated_timeouts_with_no_answer_open_it() {
        let mut b = breaker();
        b.record(Outcome::Answered, 1_000);
        assert!(!b.record(Outcome::TimedOut, 1_100));
        assert!(!b.record(Outcome::TimedOut, 2_000));
        // Three timeouts, but only 1.9 s of silence.
        assert!(!b.record(Outcome::TimedOut, 2_900));
        // Silence long enough.
        assert!(b.record(Outcome::TimedOut, 3_000));
        assert!(b.is_open());
    }

    #[test]
    fn silence_alone_needs_enough_timeouts() {
        let mut b = breaker();
        assert!(!b.record(Outcome::TimedOut, 60_000));
        assert!(!b.record(Outcome::TimedOut, 61_000));
        assert!(b.record(Outcome::TimedOut, 62_000));
    }

    #[test]
    fn an_unreachable_store_is_down_at_once() {
        let mut b = breaker();
        b.record(Outcome::Answered, 1_000);
        assert!(b.record(Outcome::Unreachable, 1_001));
    }

    #[test]
    fn any_answer_closes_it_and_restarts_the_count() {
        let mut b = breaker();
        assert!(b.record(Outcome::Unreachable, 10));
        assert!(!b.record(Outcome::Answered, 20));
        // Timeouts counted before the answer do not carry over.
        assert!(!b.record(Outcome::TimedOut, 5_000));
        assert!(!b.record(Outcome::TimedOut, 5_001));
        assert!(b.record(Outcome::TimedOut, 5_002));
    }

    #[test]
    fn an_answer_reported_late_does_not_move_time_back() {
        let mut b = breaker();
        b.record(Outcome::Answered, 5_000);
        b.record(Outcome::Answered, 4_000);
        for _ in 0..3 {
            b.record(Outcome::TimedOut, 6_500);
        }
        assert!(!b.is_open(), "only 1.5 s since the last answer");
    }
}
