//! The two points around a call's registration in the CRM:
//! - `need_registration`: may stop a call from reaching the CRM. Asked once per call, at the
//!   first stage pbxgate would tell the CRM about it: `conversation_requested` when its first
//!   live event (an extension rings, the customer is dialled) is about to go out, or
//!   `call_ended` when the history is about to be sent and no live answer is known (no live
//!   event, live events late or off, a restart in between). The registration rules
//!   (`[[rules]]`) run first: a call they ignore never reaches the hook. The answer holds for
//!   the rest of the call ([`Verdicts`]): `false` sends no further live event and no history;
//!   the call stays in the recent calls, marked ignored. A hook that fails or says nothing:
//!   the call is registered.
//! - `post_registration`: a notification after the call reached the CRM (its first live event
//!   at `conversation_requested`, its history at `call_ended`). Nothing is taken from the
//!   answer; a failure is only logged and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::calls::CallRecord;
use crate::hooks::{FieldKind, HookResult, Hooks, Stage};
use crate::pipeline::CallSink;

pub const NEED_REGISTRATION: &str = "need_registration";
pub const POST_REGISTRATION: &str = "post_registration";

/// How many calls' answers are remembered (live calls and calls waiting for their upload).
const KEPT: usize = 65_536;

/// What `need_registration` may return.
pub const RESULT: &[(&str, FieldKind)] = &[("result", FieldKind::Bool)];

/// The input of both points: the call and its stage.
pub fn input(call_full: Value, stage: Stage) -> Value {
    json!({"call_full": call_full, "call_stage": stage.as_str()})
}

/// `need_registration` for one call at `stage`: whether to register it (true when no hook is
/// configured, it failed, or it did not say).
pub async fn need_registration(hooks: &Hooks, call_full: Value, stage: Stage) -> bool {
    match hooks
        .call(NEED_REGISTRATION, input(call_full, stage), RESULT)
        .await
    {
        HookResult::Changed(data) => data.get("result").and_then(Value::as_bool) != Some(false),
        HookResult::NotConfigured | HookResult::Default(_) => true,
    }
}

/// `post_registration`, in a task of its own (nobody waits for a notification).
pub fn post_registration(hooks: &Hooks, call_full: impl FnOnce() -> Value, stage: Stage) {
    if !hooks.is_configured(POST_REGISTRATION) {
        return;
    }
    let hooks = hooks.clone();
    let input = input(call_full(), stage);
    tokio::spawn(async move {
        let _ = hooks.call(POST_REGISTRATION, input, &[]).await;
    });
}

/// What `need_registration` answered, per call (`externalId`), shared by the live path and
/// the history: the first to ask for a call asks the hook, whoever comes while it runs waits
/// for that answer, and it holds for the call. Bounded: the oldest calls are forgotten first
/// (a forgotten call is asked again when its history goes out).
#[derive(Clone, Default)]
pub struct Verdicts {
    inner: Arc<Mutex<Kept>>,
}

type Verdict = Arc<tokio::sync::OnceCell<bool>>;

#[derive(Default)]
struct Kept {
    by_id: HashMap<String, Verdict>,
    order: VecDeque<String>,
}

impl Verdicts {
    /// The answer for the call if one is known (no waiting).
    pub fn get(&self, id: &str) -> Option<bool> {
        self.lock().by_id.get(id).and_then(|c| c.get().copied())
    }

    /// The call's answer: the one given, the one being asked (waited for), or `ask`'s. If
    /// the caller stops waiting while `ask` runs, the next caller asks again.
    pub async fn decide<F>(&self, id: &str, ask: impl FnOnce() -> F) -> bool
    where
        F: std::future::Future<Output = bool>,
    {
        let cell = self.cell(id);
        *cell.get_or_init(ask).await
    }

    /// Settles the call's answer unless it has one.
    pub fn set(&self, id: &str, register: bool) {
        let _ = self.cell(id).set(register);
    }

    fn cell(&self, id: &str) -> Verdict {
        let mut k = self.lock();
        if let Some(c) = k.by_id.get(id) {
            return c.clone();
        }
        let cell = Verdict::default();
        k.by_id.insert(id.to_string(), cell.clone());
        k.order.push_back(id.to_string());
        while k.order.len() > KEPT {
            if let Some(old) = k.order.pop_front() {
                k.by_id.remove(&old);
            }
        }
        cell
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sink in front of `next` that marks the finished calls the hook refused as ignored,
    /// so that they are kept locally and never queued for the CRM.
    pub fn sink(&self, next: Arc<dyn CallSink>) -> VerdictSink {
        VerdictSink {
            verdicts: self.clone(),
            next,
        }
    }
}

/// See [`Verdicts::sink`].
pub struct VerdictSink {
    verdicts: Verdicts,
    next: Arc<dyn CallSink>,
}

impl CallSink for VerdictSink {
    fn accept(&self, mut record: CallRecord) {
        if !record.ignored && self.verdicts.get(&record.external_id) == Some(false) {
            record.ignored = true;
            record.registration = Some(format!("ignore by hooks.{NEED_REGISTRATION}"));
        }
        self.next.accept(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_answers_are_forgotten_first() {
        let v = Verdicts::default();
        for i in 0..=KEPT {
            v.set(&i.to_string(), i % 2 == 0);
        }
        assert_eq!(v.get("0"), None);
        assert_eq!(v.get("1"), Some(false));
        assert_eq!(v.get(&KEPT.to_string()), Some(KEPT % 2 == 0));
        // The first answer holds.
        v.set("1", true);
        assert_eq!(v.get("1"), Some(false));
    }

    #[tokio::test]
    async fn a_call_is_asked_once_and_a_second_caller_waits_for_the_answer() {
        let v = Verdicts::default();
        let asked = std::sync::atomic::AtomicU32::new(0);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let first = v.decide("c", || async {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = wait.await;
            false
        });
        let second = async {
            // Asked while the first is under way: its own question is never put.
            let answer = v
                .decide("c", || async {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    true
                })
                .await;
            answer
        };
        let release = async {
            tokio::task::yield_now().await;
            let _ = go.send(());
        };
        let (a, b, ()) = tokio::join!(first, second, release);
        assert_eq!((a, b), (false, false));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(v.get("c"), Some(false));
    }
}
