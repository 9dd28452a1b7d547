//! Client-side copy of the portal's leaky bucket (the retry schedule is
//! [`crate::base::backoff`]).
//!
//! Bitrix24 counts every HTTP request (a `batch` is one) into a bucket that drains `rps` per
//! second and answers `503 QUERY_LIMIT_EXCEEDED` above `burst`. We keep our own bucket of the
//! same shape and wait for room in it before each request, so the portal's never overflows on
//! our account. It is kept smaller and slower than the portal's:
//! - the portal's bucket is per portal *and* source IP, shared with every other application on
//!   it (and other pbxgate commands), so we leave 10 % of it (at least one request) to them;
//! - our clock and the portal's differ and the network bunches requests up, so we drain 3 %
//!   slower than the portal does.
//!
//! The bucket is the generic cell rate algorithm: one instant (the "theoretical arrival time")
//! under a short lock, slots handed out in call order, never a lock across an await.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// We drain this much slower than the portal.
const DRAIN_MARGIN: f64 = 1.03;

#[derive(Debug)]
pub struct LeakyBucket {
    /// Time the bucket takes to drain one request.
    interval: Duration,
    /// How many requests it holds (after the margin).
    capacity: u32,
    /// When the bucket will be empty again if nothing more comes (`None`: empty now).
    empty_at: Mutex<Option<Instant>>,
}

impl LeakyBucket {
    /// A bucket that drains `rps` per second and holds `burst` (both as the portal has them;
    /// the margins are applied here).
    pub fn new(rps: u32, burst: u32) -> LeakyBucket {
        let rps = rps.max(1);
        let burst = burst.max(1);
        LeakyBucket {
            interval: Duration::from_secs_f64(DRAIN_MARGIN / f64::from(rps)),
            capacity: effective_capacity(burst),
            empty_at: Mutex::new(None),
        }
    }

    /// How many requests may go out at once after an idle period.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Waits until the bucket has room for one more request and counts it in. Never fails: a
    /// full bucket only delays. A caller that gives up while waiting leaves its slot unused,
    /// which only makes the pace more conservative.
    pub async fn acquire(&self) {
        let at = {
            let mut empty_at = self.lock();
            let now = Instant::now();
            let level_end = empty_at.map_or(now, |t| t.max(now));
            // Room for one more once the level is at most capacity - 1: `level_end` minus the
            // time `capacity - 1` requests take to drain.
            let tolerance = self.interval * (self.capacity - 1);
            let at = level_end.checked_sub(tolerance).unwrap_or(now).max(now);
            *empty_at = Some(level_end + self.interval);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// How long a request asked for now would wait for room (zero: it goes at once).
    pub fn wait(&self) -> Duration {
        let empty_at = *self.lock();
        let now = Instant::now();
        let level_end = empty_at.map_or(now, |t| t.max(now));
        let tolerance = self.interval * (self.capacity - 1);
        level_end
            .checked_sub(tolerance)
            .unwrap_or(now)
            .max(now)
            .duration_since(now)
    }

    /// The portal said its bucket is full (`QUERY_LIMIT_EXCEEDED`): from now on, requests go
    /// out at the drain rate only, until it had time to empty.
    pub fn fill(&self) {
        let mut empty_at = self.lock();
        let full = Instant::now() + self.interval * self.capacity;
        *empty_at = Some(empty_at.map_or(full, |t| t.max(full)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.empty_at.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// 90 % of the portal's bucket, and at least one request less than it (at least 1).
fn effective_capacity(burst: u32) -> u32 {
    (burst.saturating_mul(9) / 10).min(burst - 1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn times(bucket: &LeakyBucket, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            bucket.acquire().await;
            out.push(Instant::now() - start);
        }
        out
    }

    /// The portal's own bucket, fed with our send times: never above its capacity.
    fn portal_level_max(sent: &[Duration], rps: f64) -> f64 {
        let (mut level, mut last, mut max) = (0.0f64, Duration::ZERO, 0.0f64);
        for t in sent {
            level = (level - (*t - last).as_secs_f64() * rps).max(0.0) + 1.0;
            last = *t;
            max = max.max(level);
        }
        max
    }

    #[test]
    fn capacity_keeps_a_margin() {
        assert_eq!(effective_capacity(50), 45);
        assert_eq!(effective_capacity(250), 225);
        assert_eq!(effective_capacity(3), 2);
        assert_eq!(effective_capacity(1), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_the_drain_rate() {
        let bucket = LeakyBucket::new(5, 10);
        let t = times(&bucket, 20).await;
        assert_eq!(bucket.capacity(), 9);
        assert!(t[..9].iter().all(|d| d.is_zero()), "{t:?}");
        for pair in t[9..].windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(200), "{t:?}");
        }
        assert!(portal_level_max(&t, 5.0) <= 10.0, "{t:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_empties() {
        let bucket = LeakyBucket::new(2, 3);
        times(&bucket, 5).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = times(&bucket, 2).await;
        assert_eq!(t, vec![Duration::ZERO, Duration::ZERO]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_never_overflow_the_portal() {
        let bucket = std::sync::Arc::new(LeakyBucket::new(2, 50));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..120 {
            let b = bucket.clone();
            tasks.push(tokio::spawn(async move {
                b.acquire().await;
                Instant::now() - start
            }));
        }
        let mut sent = Vec::new();
        for t in tasks {
            sent.push(t.await.unwrap());
        }
        sent.sort();
        assert!(portal_level_max(&sent, 2.0) <= 46.0, "{sent:?}");
        // 45 at once, 75 more at the (slightly slowed) drain rate.
        assert!(
            sent[119] >= Duration::from_secs_f64(75.0 * 0.5),
            "{:?}",
            sent[119]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_portal_bucket_stops_the_burst() {
        let bucket = LeakyBucket::new(5, 50);
        bucket.fill();
        let t = times(&bucket, 3).await;
        assert!(t[0] >= Duration::from_millis(200), "{t:?}");
        assert!(t[1] - t[0] >= Duration::from_millis(200), "{t:?}");
    }
}
