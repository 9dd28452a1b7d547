//! Lock-free counters that the hot paths update: a latency histogram with fixed buckets, and
//! the CRM client's request timings by endpoint and status.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: 1 ms to 10 s.
pub const LATENCY_BOUNDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// A latency histogram: one atomic add per bucket, count and sum (no lock; a reader may see an
/// observation in one field before another, which Prometheus tolerates).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// What a histogram held when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_seconds: f64,
    /// `(upper bound, observations in this bucket alone)`, `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            // The buckets' total, so that `+Inf` and `_count` always agree.
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// The CRM client's requests: how long each took, by endpoint (the path template, never a URL
/// with ids) and HTTP status (`None`: no answer), and whether the CRM refuses our key.
///
/// Each request takes a short lock to find its histogram; a CRM request is a network round
/// trip, so that is nothing next to it.
#[derive(Debug, Default)]
pub struct CrmRequests {
    by_endpoint: Mutex<Vec<Timings>>,
    rejected: AtomicBool,
    why: Mutex<Option<String>>,
}

/// An endpoint template, an HTTP status (`None`: no answer), and their timings.
type Timings = (&'static str, Option<u16>, Arc<Histogram>);

impl CrmRequests {
    pub fn observe(&self, endpoint: &'static str, status: Option<u16>, elapsed: Duration) {
        let histogram = {
            let mut table = self.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
            match table
                .iter()
                .find(|(e, s, _)| *e == endpoint && *s == status)
            {
                Some((_, _, h)) => h.clone(),
                None => {
                    let h = Arc::new(Histogram::default());
                    table.push((endpoint, status, h.clone()));
                    h
                }
            }
        };
        histogram.observe(elapsed);
    }

    /// Every `(endpoint, status)` seen, with its timings.
    pub fn snapshot(&self) -> Vec<(&'static str, Option<u16>, HistogramSnapshot)> {
        let table = self.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = table
            .iter()
            .map(|(e, s, h)| (*e, *s, h.snapshot()))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }

    /// The CRM refused the API key or the account (`why`, with no secret in it), or answered
    /// again (`None`).
    pub fn set_rejected(&self, why: Option<String>) {
        if why.is_none() && !self.rejected.load(Ordering::Relaxed) {
            return;
        }
        let mut slot = self.why.lock().unwrap_or_else(|p| p.into_inner());
        self.rejected.store(why.is_some(), Ordering::Relaxed);
        *slot = why;
    }

    /// Why the CRM refuses our key, if its last answer did.
    pub fn rejected(&self) -> Option<String> {
        if !self.rejected.load(Ordering::Relaxed) {
            return None;
        }
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 60.0305).abs() < 1e-9, "{}", s.sum_seconds);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[5], (0.05, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
    }

    #[test]
    fn a_rejection_holds_until_the_crm_answers_again() {
        let r = CrmRequests::default();
        assert_eq!(r.rejected(), None);
        r.set_rejected(Some("wrong key".into()));
        assert_eq!(r.rejected().as_deref(), Some("wrong key"));
        r.set_rejected(None);
        assert_eq!(r.rejected(), None);
    }
}
