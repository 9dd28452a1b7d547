//! Between the call models and the CRM: puts every number into its canonical form, recognises
//! employees' mobiles, and applies the registration rules (`[[rules]]`).
//!
//! A call is decided once, from what is known at its first live event (direction, the ringing or
//! dialling extensions, trunk, DID, number), or from its finished record when it had no live
//! event; the decision holds for the call's whole life, so a call never shows a pop-up and then
//! vanishes from the history, or the other way round. An ignored call sends no live event, and
//! its record is marked `ignored` (kept in the recent calls, never queued for the CRM).

use std::collections::{HashMap, VecDeque};

use crate::calls::model::{Millis, Output};
use crate::calls::record::{CallRecord, Direction, LiveEvent};
use crate::config::{Assignee, Config, MissedOwner, OutboundLine};
use crate::phone::{Number, PhoneBook};
use crate::pipeline::rules::{Decision, Facts, Rules};

/// How many routing answers are remembered for crediting missed calls.
const ROUTES_KEPT: usize = 4096;
/// A routing answer belongs to a call that started at most this long after it.
const ROUTE_LEAD: Millis = 60_000;

/// Who is credited with calls their source could not attribute (the same rule for AMI,
/// webhooks and backfill).
struct Credit {
    missed_owner: MissedOwner,
    unassigned: Option<Assignee>,
    outbound_line: OutboundLine,
    /// (when, canonical customer number, extension routing chose), oldest first.
    routes: VecDeque<(Millis, String, String)>,
}

struct CallState {
    decision: Decision,
    trunk: Option<String>,
}

pub struct Gate {
    phones: PhoneBook,
    rules: Rules,
    calls: HashMap<String, CallState>,
    credit: Credit,
}

impl Gate {
    pub fn new(config: &Config) -> Gate {
        Gate {
            phones: PhoneBook::new(&config.phone),
            rules: Rules::new(&config.rules),
            calls: HashMap::new(),
            credit: Credit {
                missed_owner: config.calls.missed_owner,
                unassigned: config.calls.unassigned(),
                outbound_line: config.calls.outbound_line.clone(),
                routes: VecDeque::new(),
            },
        }
    }

    /// Routing chose `code` for a caller at `at`: a missed call from them is credited to that
    /// manager if their phone rang (`calls.missed_owner = "responsible"`).
    pub fn note_route(&mut self, phone: &str, code: &str, at: Millis) {
        let number = self.phones.normalize(phone, None);
        if number.is_empty() || code.is_empty() {
            return;
        }
        let routes = &mut self.credit.routes;
        if routes.len() >= ROUTES_KEPT {
            routes.pop_front();
        }
        routes.push_back((at, number.canonical, code.to_string()));
    }

    /// The manager of a record its source left without one, and the line of an outbound call.
    fn credit(&self, r: &mut CallRecord) {
        if r.direction == Direction::Out && r.external_phone.is_none() {
            r.external_phone = self
                .credit
                .outbound_line
                .for_trunk(r.trunk.as_deref())
                .map(str::to_string);
        }
        if r.code.is_some() || r.user_id.is_some() {
            return;
        }
        let routed = (r.direction == Direction::In)
            .then(|| {
                self.credit
                    .routes
                    .iter()
                    .rev()
                    .find(|(at, phone, _)| {
                        *phone == r.customer_number && *at >= r.start - ROUTE_LEAD && *at <= r.end
                    })
                    .map(|(_, _, code)| code.as_str())
            })
            .flatten();
        r.code = match r.direction {
            Direction::In => r.rung(self.credit.missed_owner, routed),
            _ => r
                .placed_by
                .clone()
                .or_else(|| r.rung(MissedOwner::FirstRung, None)),
        };
        if r.code.is_none() {
            match &self.credit.unassigned {
                Some(Assignee::Code(c)) => r.code = Some(c.clone()),
                Some(Assignee::User(id)) => r.user_id = Some(*id),
                None => {}
            }
        }
    }

    /// Rewrites `out` in place: numbers canonical, ignored calls' live events removed, their
    /// records marked.
    pub fn apply(&mut self, out: &mut Vec<Output>) {
        // A call finishing in this batch without an earlier live event is decided from its
        // record, which knows the most (its hangup event comes first in the batch).
        for o in out.iter() {
            if let Output::Finished(r) = o {
                if !self.calls.contains_key(&r.external_id) {
                    let state = self.decide_record(r);
                    self.calls.insert(r.external_id.clone(), state);
                }
            }
        }
        let mut kept = Vec::with_capacity(out.len());
        for o in out.drain(..) {
            match o {
                Output::Live(mut e) => {
                    let id = e.external_id().to_string();
                    if !self.calls.contains_key(&id) {
                        let state = self.decide_live(&e);
                        self.calls.insert(id.clone(), state);
                    }
                    let state = &self.calls[&id];
                    if state.decision.register {
                        self.canonical_live(&mut e, state.trunk.as_deref());
                        kept.push(Output::Live(e));
                    }
                }
                Output::Finished(mut r) => {
                    let state = self
                        .calls
                        .remove(&r.external_id)
                        .unwrap_or_else(|| self.decide_record(&r));
                    self.canonical_record(&mut r);
                    self.credit(&mut r);
                    r.registration = Some(state.decision.describe());
                    r.ignored = !state.decision.register;
                    kept.push(Output::Finished(r));
                }
            }
        }
        *out = kept;
    }

    fn decide(&self, id: &str, facts: Facts<'_>, trunk: Option<String>) -> CallState {
        let decision = match facts.phone.and_then(|n| self.phones.fmc(n)) {
            Some(code) => Decision {
                register: false,
                rule: Some(format!("phone.fmc (the mobile of extension {code})")),
            },
            None => self.rules.decide(&facts),
        };
        tracing::debug!(id, decision = %decision.describe(), "registration decided");
        CallState { decision, trunk }
    }

    fn decide_live(&self, e: &LiveEvent) -> CallState {
        let (direction, phone, did, codes, trunk) = match e {
            LiveEvent::Ringing {
                phone,
                did,
                codes,
                trunk,
                ..
            } => (Direction::In, phone, did.as_deref(), codes.clone(), trunk),
            LiveEvent::Dialing {
                phone,
                codes,
                trunk,
                ..
            } => (Direction::Out, phone, None, codes.clone(), trunk),
            LiveEvent::Hangup {
                phone,
                direction,
                codes,
                ..
            } => (*direction, phone, None, codes.clone(), &None),
            LiveEvent::Progress {
                phone,
                direction,
                ringing,
                talking,
                ..
            } => {
                let mut codes = ringing.clone();
                codes.extend(talking.iter().filter(|c| !ringing.contains(c)).cloned());
                (*direction, phone, None, codes, &None)
            }
        };
        let phone = self.phones.normalize(phone, trunk.as_deref());
        let did = did.map(|d| self.phones.normalize(d, trunk.as_deref()));
        let facts = Facts {
            direction: Some(direction),
            extensions: codes.iter().map(String::as_str).collect(),
            trunk: trunk.as_deref(),
            did: did.as_ref(),
            phone: Some(&phone),
        };
        self.decide(e.external_id(), facts, trunk.clone())
    }

    fn decide_record(&self, r: &CallRecord) -> CallState {
        let trunk = r.trunk.as_deref();
        let phone = self.phones.normalize(&r.customer_number, trunk);
        let did = r.did.as_deref().map(|d| self.phones.normalize(d, trunk));
        let mut extensions: Vec<&str> = Vec::new();
        let named = [&r.code, &r.placed_by, &r.answered_by, &r.final_extension];
        for e in named.into_iter().flatten().map(String::as_str).chain(
            r.rings
                .iter()
                .map(|x| x.extension.as_str())
                .chain(r.talk.iter().map(|t| t.extension.as_str())),
        ) {
            if !extensions.contains(&e) {
                extensions.push(e);
            }
        }
        let facts = Facts {
            direction: Some(r.direction),
            extensions,
            trunk,
            did: did.as_ref(),
            phone: (r.direction != Direction::Internal).then_some(&phone),
        };
        self.decide(&r.external_id, facts, r.trunk.clone())
    }

    fn canonical(&self, raw: &str, trunk: Option<&str>) -> Number {
        self.phones.normalize(raw, trunk)
    }

    fn canonical_live(&self, e: &mut LiveEvent, trunk: Option<&str>) {
        let fix = |s: &mut String| {
            let n = self.canonical(s, trunk);
            if !n.is_empty() {
                *s = n.canonical;
            }
        };
        match e {
            LiveEvent::Ringing { phone, did, .. } => {
                fix(phone);
                if let Some(d) = did {
                    fix(d);
                }
            }
            LiveEvent::Dialing { phone, .. }
            | LiveEvent::Hangup { phone, .. }
            | LiveEvent::Progress { phone, .. } => fix(phone),
        }
    }

    fn canonical_record(&self, r: &mut CallRecord) {
        let trunk = r.trunk.clone();
        let n = self.canonical(&r.customer_number, trunk.as_deref());
        if !n.is_empty() && n.canonical != r.customer_number {
            r.phone_original = Some(std::mem::replace(&mut r.customer_number, n.canonical));
        }
        for field in [&mut r.did, &mut r.external_phone].into_iter().flatten() {
            let n = self.canonical(field, trunk.as_deref());
            if !n.is_empty() {
                *field = n.canonical;
            }
        }
    }
}
