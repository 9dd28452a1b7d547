//! Live call events to the CRM (through the port): pop-ups while phones ring, hangups.
//! A pop-up is useless late: each event gets a short deadline (retries within the CRM rate
//! limit included), then it is dropped with a log line. Nothing is sent while the module is
//! inactive or frozen, or without an API key.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::base::clock::now_ms;
use crate::calls::model::Millis;
use crate::calls::record::{Direction, LiveEvent};
use crate::config::Config;
use crate::crm::{Crm, Published};
use crate::pipeline::tracker::TrackerStats;
use crate::store::Store;

/// How many calls whose pop-up reached the CRM are remembered until their hangup.
const ANNOUNCED_KEPT: usize = 16_384;

/// The calls whose `in`/`out` reached the CRM: only they get a `hangup`.
#[derive(Default)]
struct Announced {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Announced {
    fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            while self.order.len() > ANNOUNCED_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    fn take(&mut self, id: &str) -> bool {
        // The order queue keeps the id until it is evicted: harmless, bounded.
        self.ids.remove(id)
    }
}

/// Sends live events one at a time, in order. Each was stamped when it happened (`at`, Unix
/// ms) and gets `calls.live_event_deadline` from then: a pop-up the CRM cannot have in time is
/// dropped (counted) rather than shown after the call; a hangup goes only to calls whose pop-up
/// got through, and always gets the whole deadline (it closes a card a manager sees).
pub async fn run(
    mut rx: mpsc::Receiver<(Millis, LiveEvent)>,
    crm: Arc<dyn Crm>,
    store: Store,
    config: Arc<Config>,
    stats: Arc<TrackerStats>,
) {
    let deadline: Duration = config.calls.live_event_deadline;
    let mut announced = Announced::default();
    while let Some((at, e)) = rx.recv().await {
        if let LiveEvent::Hangup {
            direction: Direction::Internal,
            ..
        } = &e
        {
            if !config.calls.send_internal {
                continue;
            }
        }
        if !crm.is_configured() {
            continue;
        }
        if !store.activity().map(|a| a.may_push()).unwrap_or(true) {
            tracing::debug!("module inactive or frozen: live call event not sent");
            continue;
        }
        let id = e.external_id();
        let kind = e.kind();
        let hangup = matches!(e, LiveEvent::Hangup { .. });
        if hangup && !announced.take(id) {
            stats.hangups_without_popup.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                id,
                "hangup not sent: the call's pop-up never reached the CRM"
            );
            continue;
        }
        // A hangup closes a pop-up the manager sees: late is better than never.
        let age = Duration::from_millis(u64::try_from(now_ms() - at).unwrap_or(0));
        let left = if hangup {
            Some(deadline)
        } else {
            deadline.checked_sub(age).filter(|d| !d.is_zero())
        };
        let Some(left) = left else {
            stats.live_events_late.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kind = %kind, id = %id, age_ms = age.as_millis() as u64,
                "live call event dropped: older than calls.live_event_deadline");
            continue;
        };
        match tokio::time::timeout(left, crm.publish(&e)).await {
            Ok(Ok(Published::Sent)) => {
                stats.live_events_sent.fetch_add(1, Ordering::Relaxed);
                if !hangup {
                    announced.insert(id);
                }
            }
            Ok(Ok(Published::Skipped)) => {}
            Ok(Err(err)) => {
                stats.live_events_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, id = %id, error = %err, "live call event dropped");
            }
            Err(_) => {
                stats.live_events_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, id = %id, deadline_ms = deadline.as_millis() as u64,
                    "live call event dropped: the CRM did not take it in time");
            }
        }
    }
}
