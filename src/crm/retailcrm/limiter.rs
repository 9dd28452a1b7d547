//! Client-side pacing of CRM requests (the retry schedule is [`crate::base::backoff`]).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Requests are spaced this much wider than `1/rps`, so that jitter between our clock and the
/// CRM's never makes it count `rps + 1` requests in one of its one-second windows.
const SAFETY_MARGIN: f64 = 1.03;

/// Spaces requests at least `1/rps` apart (no bursts): whatever the CRM's window alignment, it
/// never sees more than `rps` requests in any second.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next_slot: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn per_second(rps: u32) -> Self {
        let rps = rps.max(1);
        RateLimiter {
            interval: Duration::from_secs_f64(SAFETY_MARGIN / f64::from(rps)),
            next_slot: Mutex::new(None),
        }
    }

    /// Waits for this caller's slot. Slots are handed out in call order; a caller that gives
    /// up while waiting leaves its slot unused, which only makes the pace more conservative.
    pub async fn acquire(&self) {
        let slot = {
            // The lock is held for two assignments, never across an await.
            let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_by_the_interval() {
        let limiter = RateLimiter::per_second(10);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..5 {
            limiter.acquire().await;
            times.push(Instant::now() - start);
        }
        assert_eq!(times[0], Duration::ZERO);
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(100), "{times:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_lets_the_next_request_through_at_once() {
        let limiter = RateLimiter::per_second(2);
        limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = Instant::now();
        limiter.acquire().await;
        assert_eq!(Instant::now(), before);
    }
}
