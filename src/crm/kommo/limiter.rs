//! The client's pace: at most `kommo.rps` requests per second, with a margin (the retry
//! schedule is [`crate::base::backoff`]).
//!
//! Kommo allows 7 requests per second per account and answers 429 above it; when an
//! integration keeps going over (or asks the same thing again and again) it blocks the
//! account's API or the caller's IP, which an operator has to get lifted through support. So
//! we stay below: at most `rps` requests in any window of [`WINDOW`] (a second and 5 %, for
//! clocks and for the network bunching requests up: 6.67 per second at 7, 95 % of the limit),
//! and after a 429 nothing goes out for a while ([`Window::pause`]). Set `kommo.rps` lower to
//! leave room for other integrations of the same account.
//!
//! A sliding window log: the send times of the last `limit` requests under a short lock, slots
//! handed out in call order (a later caller gets a later slot), never a lock across an await.
//! A burst up to the limit goes at once, so a call card's few requests are not delayed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The window the limit counts in: a second and a margin.
pub const WINDOW: Duration = Duration::from_millis(1050);

#[derive(Debug)]
pub struct Window {
    /// Requests per window.
    limit: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Send times handed out (some may be in the future), oldest first, at most `limit`.
    sent: VecDeque<Instant>,
    /// Nothing goes out before this (after a 429).
    paused_until: Option<Instant>,
}

impl Window {
    /// A limit for an account that allows `rps` requests per second.
    pub fn new(rps: u32) -> Window {
        let limit = usize::try_from(rps.max(1)).unwrap_or(1);
        Window {
            limit,
            state: Mutex::new(State::default()),
        }
    }

    /// How many requests may go out in one window.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Waits for this request's slot and counts it in. Never fails: a full window only
    /// delays. A caller that gives up while waiting leaves its slot unused, which only makes
    /// the pace more conservative.
    pub async fn acquire(&self) {
        let at = {
            let mut s = self.lock();
            let now = Instant::now();
            let mut at = s.paused_until.map_or(now, |p| p.max(now));
            if s.sent.len() >= self.limit {
                let oldest = s.sent.pop_front().expect("a full window");
                at = at.max(oldest + WINDOW);
            }
            // In call order: never before the slot handed out last.
            if let Some(last) = s.sent.back() {
                at = at.max(*last);
            }
            s.sent.push_back(at);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Kommo said 429: nothing goes out for `pause` (then at most a window's limit at once).
    pub fn pause(&self, pause: Duration) {
        let mut s = self.lock();
        let until = Instant::now() + pause;
        s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn times(window: &Window, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            window.acquire().await;
            out.push(Instant::now() - start);
        }
        out
    }

    /// The most requests any one-second window holds.
    fn most_in_a_second(sent: &[Duration]) -> usize {
        sent.iter()
            .map(|t| {
                sent.iter()
                    .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_the_window_holds_it_below_the_limit() {
        let window = Window::new(7);
        assert_eq!(window.limit(), 7);
        let t = times(&window, 30).await;
        assert!(t[..7].iter().all(|d| d.is_zero()), "{t:?}");
        assert!(t[7] >= WINDOW, "{t:?}");
        assert!(most_in_a_second(&t) <= 7, "{t:?}");
        // 30 requests at 7 per 1.05 s: four full windows after the first.
        assert!(t[28] >= WINDOW * 4, "{t:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_window() {
        let window = std::sync::Arc::new(Window::new(7));
        let start = Instant::now();
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let w = window.clone();
                tokio::spawn(async move {
                    w.acquire().await;
                    Instant::now() - start
                })
            })
            .collect();
        let mut sent = Vec::new();
        for t in tasks {
            sent.push(t.await.unwrap());
        }
        sent.sort();
        assert!(most_in_a_second(&sent) <= 7, "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_window_empties_and_a_pause_holds_everything() {
        let window = Window::new(3);
        times(&window, 5).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(times(&window, 2).await, vec![Duration::ZERO; 2]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        window.pause(Duration::from_secs(1));
        let t = times(&window, 1).await;
        assert!(t[0] >= Duration::from_secs(1), "{t:?}");
        assert_eq!(Window::new(1).limit(), 1);
    }
}
