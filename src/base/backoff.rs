//! The retry schedule shared by every reconnecting or retrying task (AMI, CRM requests, the
//! history uploader). What is worth retrying is each caller's decision; this is only *when*.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter: a random delay in `[0, min(max, base·2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..30 {
            let d = backoff(attempt, base, max);
            assert!(d <= max);
            assert!(d <= base * 2u32.pow(attempt.min(10)));
        }
    }
}
