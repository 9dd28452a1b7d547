//! The call model: AMI events in, live call events and finished call records out.
//!
//! A **call** is what the customer experiences. It is keyed by the Linkedid its first channel
//! had; every channel is also indexed by Uniqueid (channels may move between calls when their
//! Linkedid changes after a transfer; there is no event for that, the next snapshot shows it).
//! Channels are classified by [`Classifier`]. Who talked to the customer is read from bridges:
//! a talk segment runs while a customer-side channel and an extension share a bridge, so blind
//! and attended transfers, pickups and queues need no special cases. Ringing comes from
//! DialBegin/DialEnd (a DialEnd never downgrades an ANSWER; queues send CANCEL twice).
//!
//! Parking (`ParkedCall` … `UnParkedCall` / `ParkedCallGiveUp` / `ParkedCallTimeOut`) is only
//! noted, as a span of the parked channel: the pick-up is an ordinary bridge with the extension
//! that retrieves it, so it changes nothing else.
//!
//! The model is synchronous and deterministic: every event comes with its time (the PBX's
//! `Timestamp:` when present, else the arrival time), so tests replay captures with their times.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::classify::{dial_string_number, Classifier, Role};
use super::record::{
    CallRecord, ChannelKind, ClickToCall, Conversation, Direction, LiveEvent, MainChannel, Outcome,
    Ring, TalkSegment,
};
use crate::pbx::ami::Frame;

pub use crate::base::clock::Millis;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Channel {
    call: String,
    role: Role,
    /// The customer's side of the call (inbound customer channel, outbound customer leg, or a
    /// Local half standing for them).
    customer: bool,
    caller_num: String,
    bridge: Option<String>,
    /// Channel name (`PJSIP/101-00000006`).
    #[serde(default)]
    name: String,
}

/// A channel of the call that sat in a parking lot, from `ParkedCall` until it left.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Park {
    channel: String,
    name: String,
    from: Millis,
    until: Option<Millis>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Call {
    key: String,
    start: Millis,
    last_event: Millis,
    live: HashSet<String>,
    /// The customer channel (inbound) or customer leg (outbound).
    customer: Option<String>,
    inbound: bool,
    customer_number: Option<String>,
    did: Option<String>,
    customer_end: Option<Millis>,
    customer_dial_status: Option<String>,
    /// The extension that placed an outbound call (dialled the customer, or was originated).
    placed_by: Option<String>,
    /// The first channel's extension (internal calls: the caller).
    root_extension: Option<String>,
    originated: bool,
    originate_exten: Option<String>,
    originate_failed: bool,
    click_to_call: Option<ClickToCall>,
    rings: Vec<Ring>,
    /// Dest uniqueid → index in `rings`.
    ring_by_dest: HashMap<String, usize>,
    talk: Vec<TalkSegment>,
    recordings: Vec<String>,
    /// Extensions already announced in a live `in`/`out` event.
    announced: HashSet<String>,
    last_hangup: Millis,
    reaped: bool,
    /// Hangup cause of the customer channel.
    customer_cause: Option<String>,
    /// Outbound: the caller number presented on the customer leg, when it is an external number.
    external_line: Option<String>,
    /// The (ringing, talking) extensions last announced by a `Progress` event.
    #[serde(default)]
    progress: (Vec<String>, Vec<String>),
    /// (channel, on hold from, until).
    holds: Vec<(String, Millis, Option<Millis>)>,
    /// The carrier channel without its sequence (`PJSIP/trunk`).
    trunk: Option<String>,
    /// The channel whose Uniqueid is the key, once seen (its type is set when the call ends).
    #[serde(default)]
    main_channel: Option<MainChannel>,
    /// Uniqueid → name of the channels conversations may name (rung and talking extensions).
    #[serde(default)]
    channel_names: HashMap<String, String>,
    /// Channels of the call that were parked.
    #[serde(default)]
    parks: Vec<Park>,
}

/// What the model produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Live(LiveEvent),
    Finished(Box<CallRecord>),
}

/// A call in progress as the admin page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveCall {
    pub external_id: String,
    pub direction: Direction,
    /// The customer's number (inbound: the caller, outbound: the number dialled).
    pub phone: String,
    pub start: Millis,
    /// Extensions ringing now.
    pub ringing: Vec<String>,
    /// Extensions talking now.
    pub talking: Vec<String>,
    /// When the call was first answered.
    pub answered: Option<Millis>,
}

impl LiveCall {
    pub fn from_parts(
        external_id: String,
        direction: Direction,
        phone: String,
        start: Millis,
        rings: &[Ring],
        talk: &[TalkSegment],
    ) -> LiveCall {
        let mut ringing: Vec<String> = rings
            .iter()
            .filter(|r| r.end.is_none())
            .map(|r| r.extension.clone())
            .collect();
        let mut talking: Vec<String> = talk
            .iter()
            .filter(|t| t.end.is_none())
            .map(|t| t.extension.clone())
            .collect();
        ringing.dedup();
        talking.dedup();
        LiveCall {
            external_id,
            direction,
            phone,
            start,
            ringing,
            talking,
            answered: talk.iter().map(|t| t.start).min(),
        }
    }
}

pub struct CallModel {
    classifier: Classifier,
    system_id: String,
    channels: HashMap<String, Channel>,
    calls: HashMap<String, Call>,
    bridges: HashMap<String, Vec<String>>,
    expected_c2c: HashMap<String, ClickToCall>,
    expected_order: std::collections::VecDeque<String>,
    /// Channel → calls holding an open talk segment that involves it.
    open_talk: HashMap<String, Vec<String>>,
    /// Recently hung-up Uniqueids (bounded), so late events do not resurrect them.
    gone: HashSet<String>,
    gone_order: std::collections::VecDeque<String>,
    /// Calls whose channels have all hung up, held for [`GRACE`] ms for late events
    /// (an OriginateResponse can follow the hangups).
    closing: std::collections::VecDeque<(Millis, String)>,
    closing_calls: HashMap<String, Call>,
    /// Channel name without its sequence suffix (`PJSIP/101`, `Local/199@internal`) → the
    /// latest call that had such a channel: matches an OriginateResponse that names no Uniqueid.
    by_base_name: HashMap<String, String>,
    /// Call key → its `last_event` when it was last journaled.
    journaled: HashMap<String, Millis>,
}

/// One call as the journal keeps it: the call and its channels.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    #[serde(default = "v1")]
    v: u32,
    call: Call,
    channels: Vec<(String, Channel)>,
    /// Every channel had hung up; waiting out the grace period.
    closing: bool,
}

fn v1() -> u32 {
    1
}

/// What the journal must do after [`CallModel::journal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    Put(String, Vec<u8>),
    Remove(String),
}

/// How long a call whose channels are gone waits for late events before it is finished.
pub const GRACE: Millis = 2000;

/// How many hung-up Uniqueids are remembered.
const GONE_MEMORY: usize = 4096;

impl CallModel {
    pub fn new(classifier: Classifier, system_id: &str) -> CallModel {
        CallModel {
            classifier,
            system_id: system_id.to_string(),
            channels: HashMap::new(),
            calls: HashMap::new(),
            bridges: HashMap::new(),
            expected_c2c: HashMap::new(),
            expected_order: std::collections::VecDeque::new(),
            open_talk: HashMap::new(),
            gone: HashSet::new(),
            gone_order: std::collections::VecDeque::new(),
            closing: std::collections::VecDeque::new(),
            closing_calls: HashMap::new(),
            by_base_name: HashMap::new(),
            journaled: HashMap::new(),
        }
    }

    /// The changes since the last call: calls that saw events are written, finished ones
    /// removed. The tracker applies them to the store once a second.
    pub fn journal(&mut self) -> Vec<JournalOp> {
        let mut ops = Vec::new();
        let gone: Vec<String> = self
            .journaled
            .keys()
            .filter(|k| !self.calls.contains_key(*k) && !self.closing_calls.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.journaled.remove(&key);
            ops.push(JournalOp::Remove(key));
        }
        let all = self
            .calls
            .values()
            .map(|c| (c, false))
            .chain(self.closing_calls.values().map(|c| (c, true)));
        for (call, closing) in all {
            let seen = self.journaled.get(&call.key).copied();
            if seen == Some(call.last_event) && !closing {
                continue;
            }
            if closing && seen == Some(call.last_event.saturating_neg()) {
                continue;
            }
            let channels: Vec<(String, Channel)> = call
                .live
                .iter()
                .filter_map(|u| self.channels.get(u).map(|c| (u.clone(), c.clone())))
                .collect();
            let snap = Snapshot {
                v: 1,
                call: call.clone(),
                channels,
                closing,
            };
            if let Ok(bytes) = serde_json::to_vec(&snap) {
                ops.push(JournalOp::Put(call.key.clone(), bytes));
                // A closing call is marked apart so that it is written once more as closing.
                let mark = if closing {
                    call.last_event.saturating_neg()
                } else {
                    call.last_event
                };
                self.journaled.insert(call.key.clone(), mark);
            }
        }
        ops
    }

    /// Resumes a call from its journal entry (after a restart). Its channels are checked by the
    /// resync that follows every AMI login; a call that was closing finishes after the grace.
    pub fn restore(&mut self, entry: &[u8], now: Millis) -> Result<(), serde_json::Error> {
        let snap: Snapshot = serde_json::from_slice(entry)?;
        let key = snap.call.key.clone();
        for (uid, ch) in snap.channels {
            if let Some(b) = &ch.bridge {
                let members = self.bridges.entry(b.clone()).or_default();
                if !members.contains(&uid) {
                    members.push(uid.clone());
                }
            }
            self.channels.insert(uid, ch);
        }
        for t in snap.call.talk.iter().filter(|t| t.end.is_none()) {
            for party in [&t.customer_channel, &t.extension_channel] {
                let keys = self.open_talk.entry(party.clone()).or_default();
                if !keys.contains(&key) {
                    keys.push(key.clone());
                }
            }
        }
        self.journaled.insert(key.clone(), snap.call.last_event);
        if snap.closing || snap.call.live.is_empty() {
            self.closing.push_back((now, key.clone()));
            self.closing_calls.insert(key, snap.call);
        } else {
            self.calls.insert(key, snap.call);
        }
        Ok(())
    }

    /// A `CoreShowChannel` row (resync): introduces a channel we never saw, and puts channels
    /// that share a bridge together, so a call answered while we were away counts as answered.
    pub fn show_channel(&mut self, frame: &Frame, now: Millis) {
        let known = frame
            .get("Uniqueid")
            .is_some_and(|u| self.channels.contains_key(u));
        let Some(uid) = self.touch(frame, "", now) else {
            return;
        };
        // A channel that appeared while we were away: its call is as old as its age says.
        let age = frame.get("Duration").and_then(parse_hms);
        if let (false, Some(age)) = (known, age) {
            let key = self.channels.get(&uid).map(|c| c.call.clone());
            if let Some(call) = key.and_then(|k| self.calls.get_mut(&k)) {
                call.start = call.start.min(now - age);
            }
            if let Some(main) = self
                .calls
                .get_mut(&uid)
                .and_then(|c| c.main_channel.as_mut())
            {
                main.start = main.start.min(now - age);
            }
        }
        let bridge = frame.get("BridgeId").filter(|b| !b.is_empty());
        let current = self.channels.get(&uid).and_then(|c| c.bridge.clone());
        if current.as_deref() == bridge {
            return;
        }
        // It left (or changed) its bridge while we were away.
        if let Some(old) = current {
            let leave = Frame::from_pairs(vec![
                ("Event", "BridgeLeave".to_string()),
                ("Uniqueid", uid.clone()),
                ("BridgeUniqueid", old),
            ]);
            self.bridge_leave(&leave, now);
        }
        if let Some(b) = bridge {
            let enter = Frame::from_pairs(vec![
                ("Event", "BridgeEnter".to_string()),
                ("Uniqueid", uid.clone()),
                ("BridgeUniqueid", b.to_string()),
            ]);
            self.bridge_enter(&enter, now);
        }
    }

    /// Calls in progress (including those waiting out their grace period).
    pub fn live_calls(&self) -> usize {
        self.calls.len() + self.closing_calls.len()
    }

    /// The calls in progress, as the admin page shows them (who rings, who talks, since when).
    pub fn live_summary(&self) -> Vec<LiveCall> {
        self.calls
            .values()
            .map(|call| {
                let direction = if call.inbound {
                    Direction::In
                } else if call.customer.is_some() || call.originated || call.click_to_call.is_some()
                {
                    Direction::Out
                } else {
                    Direction::Internal
                };
                let phone = match direction {
                    Direction::In => call.customer_number.clone(),
                    Direction::Out => call
                        .customer_number
                        .clone()
                        .or_else(|| call.click_to_call.as_ref().map(|c| c.phone.clone()))
                        .or_else(|| call.originate_exten.clone()),
                    Direction::Internal => call.root_extension.clone(),
                };
                LiveCall::from_parts(
                    format!("{}-{}", self.system_id, call.key),
                    direction,
                    phone.unwrap_or_default(),
                    call.start,
                    &call.rings,
                    &call.talk,
                )
            })
            .collect()
    }

    /// Whether the call with this key is in progress (or closing).
    pub fn knows_call(&self, key: &str) -> bool {
        self.calls.contains_key(key) || self.closing_calls.contains_key(key)
    }

    pub fn live_channels(&self) -> usize {
        self.channels.len()
    }

    /// Uniqueids of every channel we believe alive (for resync).
    pub fn channel_ids(&self) -> Vec<String> {
        self.channels.keys().cloned().collect()
    }

    /// Our own click-to-call: the channel with Uniqueid `channel_id` will appear shortly.
    pub fn expect_click_to_call(&mut self, channel_id: &str, c2c: ClickToCall) {
        // Bounded: hints of originates that never produced a channel are forgotten, oldest first.
        if self.expected_c2c.len() >= 1024 {
            if let Some(old) = self.expected_order.pop_front() {
                self.expected_c2c.remove(&old);
            }
        }
        self.expected_order.push_back(channel_id.to_string());
        self.expected_c2c.insert(channel_id.to_string(), c2c);
    }

    /// The stable id of a call: unique across PBX restarts and several PBXs.
    pub fn external_id(&self, linkedid: &str) -> String {
        format!("{}-{}", self.system_id, linkedid)
    }

    /// Feeds one AMI event observed at `at`.
    pub fn on_event(&mut self, frame: &Frame, at: Millis, out: &mut Vec<Output>) {
        let Some(event) = frame.event() else { return };
        let at = frame
            .get("Timestamp")
            .and_then(parse_timestamp)
            .unwrap_or(at);
        self.tick(at, out);
        match event {
            "Newchannel" => self.new_channel(frame, "", at),
            "Newstate" | "NewCallerid" | "NewConnectedLine" | "NewExten" | "Newexten" => {
                self.touch(frame, "", at);
            }
            "DialBegin" => self.dial_begin(frame, at, out),
            "DialEnd" => self.dial_end(frame, at),
            "BridgeEnter" => self.bridge_enter(frame, at),
            "BridgeLeave" => self.bridge_leave(frame, at),
            "VarSet" => self.var_set(frame, at),
            "Hangup" => self.hangup(frame, at),
            "OriginateResponse" => self.originate_response(frame),
            "Hold" => self.hold(frame, at, true),
            "Unhold" => self.hold(frame, at, false),
            "ParkedCall" => self.park(frame, at, true),
            "UnParkedCall" | "ParkedCallGiveUp" | "ParkedCallTimeOut" => {
                self.park(frame, at, false)
            }
            // Cdr rows carry no Linkedid and arrive around the hangups: not a channel event.
            "Cdr" => {}
            _ => {
                // Any other channel event keeps Linkedids and variables current.
                if frame.get("Uniqueid").is_some() {
                    self.touch(frame, "", at);
                }
            }
        }
        if let Some(uid) = frame.get("Uniqueid") {
            for v in frame.get_all("ChanVariable") {
                self.chan_variable(uid, v);
            }
        }
        self.progress(frame, out);
    }

    /// A `Progress` event for each announced call of the frame's channels whose ringing or
    /// talking extensions changed (and still has some: a call that ends gets its `Hangup`).
    fn progress(&mut self, f: &Frame, out: &mut Vec<Output>) {
        let mut keys: Vec<String> = Vec::new();
        for field in ["Uniqueid", "DestUniqueid"] {
            if let Some(ch) = f.get(field).and_then(|u| self.channels.get(u)) {
                if !keys.contains(&ch.call) {
                    keys.push(ch.call.clone());
                }
            }
        }
        for key in keys {
            let Some(call) = self.calls.get_mut(&key) else {
                continue;
            };
            if call.announced.is_empty() {
                continue;
            }
            let now = LiveCall::from_parts(
                String::new(),
                Direction::In,
                String::new(),
                0,
                &call.rings,
                &call.talk,
            );
            let state = (now.ringing, now.talking);
            if state == call.progress {
                continue;
            }
            call.progress = state.clone();
            if state.0.is_empty() && state.1.is_empty() {
                continue;
            }
            let direction = if call.inbound {
                Direction::In
            } else {
                Direction::Out
            };
            let phone = call
                .customer_number
                .clone()
                .or_else(|| call.click_to_call.as_ref().map(|c| c.phone.clone()))
                .unwrap_or_default();
            out.push(Output::Live(LiveEvent::Progress {
                external_id: format!("{}-{}", self.system_id, call.key),
                phone,
                direction,
                ringing: state.0,
                talking: state.1,
            }));
        }
    }

    fn new_channel(&mut self, f: &Frame, prefix: &str, at: Millis) {
        let get = |k: &str| f.get(&format!("{prefix}{k}")).unwrap_or("").to_string();
        let uid = get("Uniqueid");
        if uid.is_empty() || self.channels.contains_key(&uid) {
            return;
        }
        let name = get("Channel");
        let linkedid = match get("Linkedid") {
            l if l.is_empty() => uid.clone(),
            l => l,
        };
        let role = self.classifier.role(&name);
        let context = get("Context");
        let exten = get("Exten");
        let caller_num = get("CallerIDNum");
        let inbound_ctx = self.classifier.is_inbound_context(&context)
            || super::classify::parse_name(&name)
                .context
                .is_some_and(|c| self.classifier.is_inbound_context(c));
        let is_root = uid == linkedid;
        let customer_inbound = inbound_ctx || (role == Role::Trunk && is_root);

        let call = self.calls.entry(linkedid.clone()).or_insert_with(|| Call {
            key: linkedid.clone(),
            start: at,
            last_hangup: at,
            ..Call::default()
        });
        call.last_event = at;
        call.live.insert(uid.clone());
        self.by_base_name
            .insert(base_name(&name).to_string(), linkedid.clone());
        if let Some(c2c) = self.expected_c2c.remove(&uid) {
            call.originated = true;
            call.placed_by = Some(c2c.code.clone());
            call.click_to_call = Some(c2c);
        }
        if is_root {
            if let Role::Extension(code) = &role {
                call.root_extension.get_or_insert(code.clone());
            }
            call.main_channel.get_or_insert_with(|| MainChannel {
                id: uid.clone(),
                name: name.clone(),
                kind: ChannelKind::Unknown,
                start: at,
                answer: (get("ChannelState") == "6").then_some(at),
                end: None,
            });
        }
        if role == Role::Trunk || customer_inbound {
            call.trunk
                .get_or_insert_with(|| base_name(&name).to_string());
        }
        if customer_inbound && call.customer.is_none() {
            // The Local half that runs the trunk dialplan (;2) is the customer; ;1 stands for them too.
            let half = super::classify::parse_name(&name).half;
            if half != Some(1) || !inbound_ctx {
                call.customer = Some(uid.clone());
                call.inbound = true;
                call.customer_number =
                    Some(caller_num.clone()).filter(|s| !s.is_empty() && s != "<unknown>");
                call.did = Some(exten.clone()).filter(|s| !s.is_empty() && s != "s");
            }
        }
        self.channels.insert(
            uid,
            Channel {
                call: linkedid,
                role,
                customer: customer_inbound,
                caller_num,
                bridge: None,
                name,
            },
        );
    }

    /// Keeps a channel's Linkedid current (moving it to another call after a transfer) and
    /// creates channels we first see through a later event (e.g. after a reconnect).
    fn touch(&mut self, f: &Frame, prefix: &str, at: Millis) -> Option<String> {
        let uid = f.get(&format!("{prefix}Uniqueid"))?.to_string();
        if !self.channels.contains_key(&uid) {
            // Only a full channel snapshot (with Linkedid) can introduce a channel we missed, and
            // a channel that hung up is never brought back by a late event (Cdr, DialEnd...).
            if f.get(&format!("{prefix}Channel")).is_none()
                || f.get(&format!("{prefix}Linkedid")).is_none()
                || self.gone.contains(&uid)
            {
                return None;
            }
            self.new_channel(f, prefix, at);
        }
        let linkedid = f
            .get(&format!("{prefix}Linkedid"))
            .unwrap_or("")
            .to_string();
        let caller = f.get(&format!("{prefix}CallerIDNum")).map(str::to_string);
        let connected = f
            .get(&format!("{prefix}ConnectedLineNum"))
            .map(str::to_string);
        if f.get(&format!("{prefix}ChannelState")) == Some("6") {
            // Up: the main channel (its Uniqueid is its call's key) was answered.
            if let Some(main) = self
                .calls
                .get_mut(&uid)
                .and_then(|c| c.main_channel.as_mut())
                .filter(|m| m.answer.is_none())
            {
                main.answer = Some(at);
            }
        }
        let ch = self.channels.get_mut(&uid)?;
        if let Some(c) = caller.filter(|c| !c.is_empty() && c != "<unknown>") {
            ch.caller_num = c;
        }
        let old = ch.call.clone();
        if !linkedid.is_empty() && linkedid != old && self.calls.contains_key(&linkedid) {
            ch.call = linkedid.clone();
            if let Some(c) = self.calls.get_mut(&old) {
                c.live.remove(&uid);
            }
            if let Some(c) = self.calls.get_mut(&linkedid) {
                c.live.insert(uid.clone());
            }
        }
        let ch = self.channels.get(&uid)?;
        let (call_key, caller_num) = (ch.call.clone(), ch.caller_num.clone());
        if let Some(c) = self.calls.get_mut(&call_key) {
            c.last_event = at;
            // The inbound customer's number may only be known after the channel was created.
            if c.inbound
                && c.customer.as_deref() == Some(uid.as_str())
                && !caller_num.is_empty()
                && caller_num != "<unknown>"
            {
                c.customer_number = Some(caller_num);
            } else if !c.inbound && c.customer.as_deref() == Some(uid.as_str()) {
                // Outbound: a dialled channel's caller ID is the party it calls (the customer);
                // its connected line is what it presents to them, our line when it is an
                // external number (an extension's own number is not a line).
                if let Some(line) = connected.filter(|n| self.classifier.is_external_number(n)) {
                    c.external_line = Some(line);
                }
            }
        }
        Some(uid)
    }

    fn dial_begin(&mut self, f: &Frame, at: Millis, out: &mut Vec<Output>) {
        let caller = self.touch(f, "", at);
        let Some(dest) = self.touch(f, "Dest", at) else {
            return;
        };
        let dial_string = f.get("DialString").unwrap_or("").to_string();
        let Some(dest_ch) = self.channels.get(&dest).cloned() else {
            return;
        };
        let caller_ch = caller.as_ref().and_then(|c| self.channels.get(c)).cloned();
        let Some(call) = self.calls.get_mut(&dest_ch.call) else {
            return;
        };

        if call.inbound && call.customer.as_deref() == Some(dest.as_str()) {
            // A channel that is dialled is not an inbound customer, even if it was created in
            // an inbound context (a PJSIP trunk endpoint's context, say): this is an outbound leg.
            call.inbound = false;
            call.customer = None;
            call.customer_number = None;
            call.did = None;
            if let Some(ch) = self.channels.get_mut(&dest) {
                ch.customer = false;
            }
        }
        let Some(call) = self.calls.get_mut(&dest_ch.call) else {
            return;
        };
        if caller.is_none() {
            // A DialBegin without a caller is an Originate's first leg.
            call.originated = true;
            if let Role::Extension(code) = &dest_ch.role {
                call.placed_by.get_or_insert(code.clone());
            }
        }
        match &dest_ch.role {
            Role::Extension(code) if call.customer.as_ref().is_none_or(|c| c != &dest) => {
                let idx = call
                    .rings
                    .iter()
                    .position(|r| &r.extension == code && r.end.is_none());
                let idx = match idx {
                    Some(i) => i,
                    None => {
                        call.rings.push(Ring {
                            extension: code.clone(),
                            start: at,
                            end: None,
                            status: None,
                        });
                        call.rings.len() - 1
                    }
                };
                call.ring_by_dest.insert(dest.clone(), idx);
                call.channel_names
                    .insert(dest.clone(), dest_ch.name.clone());
                if call.inbound && call.announced.insert(code.clone()) {
                    out.push(Output::Live(LiveEvent::Ringing {
                        external_id: format!("{}-{}", self.system_id, call.key),
                        phone: call.customer_number.clone().unwrap_or_default(),
                        did: call.did.clone(),
                        codes: vec![code.clone()],
                        trunk: call.trunk.clone(),
                    }));
                }
            }
            Role::Trunk | Role::External(_) if !call.inbound => {
                // The customer leg of an outbound call.
                let number = match &dest_ch.role {
                    Role::External(n) => n.clone(),
                    _ => dial_string_number(&dial_string).to_string(),
                };
                if call.customer.is_none() {
                    call.customer = Some(dest.clone());
                    call.customer_number = Some(number);
                    if let Some(line) = f
                        .get("DestConnectedLineNum")
                        .filter(|n| self.classifier.is_external_number(n))
                    {
                        call.external_line = Some(line.to_string());
                    }
                    if let Some(Role::Extension(code)) = caller_ch.as_ref().map(|c| &c.role) {
                        call.placed_by.get_or_insert(code.clone());
                    }
                    if let Some(ch) = self.channels.get_mut(&dest) {
                        ch.customer = true;
                    }
                    let call = self.calls.get_mut(&dest_ch.call).expect("call exists");
                    if let Some(code) = call
                        .placed_by
                        .clone()
                        .or_else(|| call.root_extension.clone())
                    {
                        if call.announced.insert(code.clone()) {
                            out.push(Output::Live(LiveEvent::Dialing {
                                external_id: format!("{}-{}", self.system_id, call.key),
                                phone: call.customer_number.clone().unwrap_or_default(),
                                codes: vec![code],
                                click_to_call: call.click_to_call.clone(),
                                trunk: call.trunk.clone(),
                            }));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn dial_end(&mut self, f: &Frame, at: Millis) {
        let Some(dest) = self.touch(f, "Dest", at) else {
            return;
        };
        let status = f.get("DialStatus").unwrap_or("").to_string();
        let Some(call_key) = self.channels.get(&dest).map(|c| c.call.clone()) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        if call.customer.as_deref() == Some(dest.as_str()) && !call.inbound {
            if call.customer_dial_status.as_deref() != Some("ANSWER") {
                call.customer_dial_status = Some(status.clone());
            }
            return;
        }
        if let Some(&idx) = call.ring_by_dest.get(&dest) {
            let ring = &mut call.rings[idx];
            // Never downgrade: queues send CANCEL twice for each loser, and a Local chain
            // reports the same ring from several channels.
            if ring.status.as_deref() != Some("ANSWER") {
                ring.status = Some(status);
                ring.end = Some(at);
            }
        }
    }

    fn bridge_enter(&mut self, f: &Frame, at: Millis) {
        let Some(uid) = self.touch(f, "", at) else {
            return;
        };
        let Some(bridge) = f.get("BridgeUniqueid").map(str::to_string) else {
            return;
        };
        if let Some(ch) = self.channels.get_mut(&uid) {
            ch.bridge = Some(bridge.clone());
        }
        let members = self.bridges.entry(bridge.clone()).or_default();
        if !members.contains(&uid) {
            members.push(uid.clone());
        }
        if let Some(swapped) = f.get("SwapUniqueid") {
            members.retain(|m| m != swapped);
        }
        self.update_talk(&bridge, at);
    }

    fn bridge_leave(&mut self, f: &Frame, at: Millis) {
        let Some(uid) = self.touch(f, "", at) else {
            return;
        };
        let Some(bridge) = f.get("BridgeUniqueid").map(str::to_string) else {
            return;
        };
        if let Some(ch) = self.channels.get_mut(&uid) {
            ch.bridge = None;
        }
        if let Some(members) = self.bridges.get_mut(&bridge) {
            members.retain(|m| m != &uid);
            if members.is_empty() {
                self.bridges.remove(&bridge);
            }
        }
        self.close_talk_of(&uid, at);
    }

    /// Opens a talk segment for every (customer, extension) pair now sharing `bridge`. In a
    /// call without a customer (internal), the caller's channel plays the customer's part.
    fn update_talk(&mut self, bridge: &str, at: Millis) {
        let Some(members) = self.bridges.get(bridge) else {
            return;
        };
        let chans: Vec<(String, Channel)> = members
            .iter()
            .filter_map(|m| self.channels.get(m).map(|c| (m.clone(), c.clone())))
            .collect();
        for (cust_id, cust) in &chans {
            let Some(call) = self.calls.get(&cust.call) else {
                continue;
            };
            let caller_side =
                !cust.customer && call.customer.is_none() && !call.inbound && *cust_id == call.key;
            if !cust.customer && !caller_side {
                continue;
            }
            for (ext_id, ext) in &chans {
                let Role::Extension(code) = &ext.role else {
                    continue;
                };
                if ext.customer || ext_id == cust_id {
                    continue;
                }
                let Some(call) = self.calls.get_mut(&cust.call) else {
                    continue;
                };
                let open = call.talk.iter().any(|t| {
                    t.end.is_none()
                        && t.customer_channel == *cust_id
                        && t.extension_channel == *ext_id
                });
                if !open {
                    for party in [cust_id, ext_id] {
                        let keys = self.open_talk.entry(party.clone()).or_default();
                        if !keys.contains(&cust.call) {
                            keys.push(cust.call.clone());
                        }
                    }
                    let Some(call) = self.calls.get_mut(&cust.call) else {
                        continue;
                    };
                    call.channel_names
                        .entry(ext_id.clone())
                        .or_insert_with(|| ext.name.clone());
                    call.talk.push(TalkSegment {
                        extension: code.clone(),
                        start: at,
                        end: None,
                        customer_channel: cust_id.clone(),
                        extension_channel: ext_id.clone(),
                        hold_ms: 0,
                    });
                    if let Some(&idx) = call.ring_by_dest.get(ext_id) {
                        let ring = &mut call.rings[idx];
                        if ring.status.is_none() {
                            ring.status = Some("ANSWER".into());
                            ring.end = Some(at);
                        }
                    }
                }
            }
        }
    }

    fn close_talk_of(&mut self, uid: &str, at: Millis) {
        let Some(keys) = self.open_talk.remove(uid) else {
            return;
        };
        for key in keys {
            let Some(call) = self.calls.get_mut(&key) else {
                continue;
            };
            for t in call.talk.iter_mut().filter(|t| t.end.is_none()) {
                if t.customer_channel == uid || t.extension_channel == uid {
                    t.end = Some(at);
                }
            }
        }
    }

    fn var_set(&mut self, f: &Frame, at: Millis) {
        let Some(uid) = self.touch(f, "", at) else {
            return;
        };
        let (Some(var), Some(value)) = (f.get("Variable"), f.get("Value")) else {
            return;
        };
        self.apply_variable(&uid, var, value);
    }

    fn chan_variable(&mut self, uid: &str, assignment: &str) {
        if let Some((var, value)) = assignment.split_once('=') {
            self.apply_variable(uid, var, value);
        }
    }

    fn apply_variable(&mut self, uid: &str, var: &str, value: &str) {
        let Some(call_key) = self.channels.get(uid).map(|c| c.call.clone()) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        match var {
            "MIXMONITOR_FILENAME"
                if !value.is_empty() && !call.recordings.iter().any(|r| r == value) =>
            {
                call.recordings.push(value.to_string());
            }
            "PBXGATE_C2C" | "__PBXGATE_C2C" => call.originated = true,
            "PBXGATE_CODE" | "__PBXGATE_CODE" if !value.is_empty() => {
                call.placed_by.get_or_insert(value.to_string());
            }
            _ => {}
        }
    }

    fn originate_response(&mut self, f: &Frame) {
        let uid = f
            .get("Uniqueid")
            .filter(|u| !u.starts_with('<'))
            .map(str::to_string);
        let chan = f.get("Channel").unwrap_or("");
        let key = uid
            .as_ref()
            .and_then(|u| {
                self.channels
                    .get(u)
                    .map(|c| c.call.clone())
                    .or_else(|| Some(u.clone()))
            })
            .filter(|k| self.calls.contains_key(k) || self.closing_calls.contains_key(k))
            .or_else(|| self.by_base_name.get(base_name(chan)).cloned());
        let Some(key) = key else { return };
        let call = match self.calls.get_mut(&key) {
            Some(c) => c,
            None => match self.closing_calls.get_mut(&key) {
                Some(c) => c,
                None => return,
            },
        };
        call.originated = true;
        if call.placed_by.is_none() {
            call.placed_by = call.root_extension.clone();
        }
        if let Some(exten) = f.get("Exten").filter(|e| !e.is_empty()) {
            call.originate_exten.get_or_insert(exten.to_string());
        }
        if f.get("Response")
            .is_some_and(|r| r.eq_ignore_ascii_case("Failure"))
        {
            call.originate_failed = true;
        }
    }

    fn hangup(&mut self, f: &Frame, at: Millis) {
        let Some(uid) = self.touch(f, "", at) else {
            return;
        };
        if let Some(call) = self
            .channels
            .get(&uid)
            .and_then(|c| self.calls.get_mut(&c.call))
        {
            if call.customer.as_deref() == Some(uid.as_str()) {
                call.customer_cause = f.get("Cause").map(str::to_string);
            }
        }
        self.remove_channel(&uid, at);
    }

    /// Hold / Unhold: the time a party spends on hold is not conversation.
    fn hold(&mut self, f: &Frame, at: Millis, on: bool) {
        let Some(uid) = self.touch(f, "", at) else {
            return;
        };
        let Some(call) = self
            .channels
            .get(&uid)
            .and_then(|c| self.calls.get_mut(&c.call))
        else {
            return;
        };
        let open = call
            .holds
            .iter()
            .rposition(|(u, _, end)| *u == uid && end.is_none());
        match (on, open) {
            (true, None) if call.holds.len() < 256 => call.holds.push((uid, at, None)),
            (false, Some(i)) => call.holds[i].2 = Some(at),
            _ => {}
        }
    }

    /// A channel we know entered (`on`) or left a parking lot. Only noted: it sits alone in a
    /// holding bridge, and whoever picks it up bridges with it as usual.
    fn park(&mut self, f: &Frame, at: Millis, on: bool) {
        let Some(uid) = f
            .get("ParkeeUniqueid")
            .filter(|u| self.channels.contains_key(*u))
            .map(str::to_string)
        else {
            return;
        };
        self.touch(f, "Parkee", at);
        let Some(ch) = self.channels.get(&uid) else {
            return;
        };
        let name = ch.name.clone();
        let Some(call) = self.calls.get_mut(&ch.call) else {
            return;
        };
        let open = call
            .parks
            .iter()
            .rposition(|p| p.channel == uid && p.until.is_none());
        match (on, open) {
            (true, None) if call.parks.len() < 64 => call.parks.push(Park {
                channel: uid,
                name,
                from: at,
                until: None,
            }),
            (false, Some(i)) => call.parks[i].until = Some(at),
            _ => {}
        }
    }

    fn remove_channel(&mut self, uid: &str, at: Millis) {
        self.close_talk_of(uid, at);
        let Some(ch) = self.channels.remove(uid) else {
            return;
        };
        // The main channel of its call (which it may have left, after a transfer).
        if let Some(main) = self
            .calls
            .get_mut(uid)
            .or_else(|| self.closing_calls.get_mut(uid))
            .and_then(|c| c.main_channel.as_mut())
            .filter(|m| m.end.is_none())
        {
            main.end = Some(at);
        }
        if self.gone.insert(uid.to_string()) {
            self.gone_order.push_back(uid.to_string());
            if self.gone_order.len() > GONE_MEMORY {
                if let Some(old) = self.gone_order.pop_front() {
                    self.gone.remove(&old);
                }
            }
        }
        if let Some(b) = &ch.bridge {
            if let Some(members) = self.bridges.get_mut(b) {
                members.retain(|m| m != uid);
                if members.is_empty() {
                    self.bridges.remove(b);
                }
            }
        }
        let Some(call) = self.calls.get_mut(&ch.call) else {
            return;
        };
        call.live.remove(uid);
        call.last_hangup = at;
        if call.customer.as_deref() == Some(uid) {
            call.customer_end = Some(at);
        }
        for (dest, idx) in &call.ring_by_dest {
            if dest == uid {
                let r = &mut call.rings[*idx];
                if r.end.is_none() {
                    r.end = Some(at);
                }
            }
        }
        if call.live.is_empty() {
            let call = self.calls.remove(&ch.call).expect("present");
            self.closing.push_back((at, call.key.clone()));
            self.closing_calls.insert(call.key.clone(), call);
        }
    }

    /// Finishes closing calls whose grace period is over.
    pub fn tick(&mut self, now: Millis, out: &mut Vec<Output>) {
        while let Some((t, _)) = self.closing.front() {
            if now - t < GRACE {
                break;
            }
            let Some((_, key)) = self.closing.pop_front() else {
                break;
            };
            if let Some(call) = self.closing_calls.remove(&key) {
                self.finish(call, out);
            }
        }
    }

    /// Finishes every closing call now (end of a replay, shutdown).
    pub fn flush(&mut self, out: &mut Vec<Output>) {
        while let Some((_, key)) = self.closing.pop_front() {
            if let Some(call) = self.closing_calls.remove(&key) {
                self.finish(call, out);
            }
        }
    }

    /// Closes calls that saw no event for `max_age` (their channels vanished while we were
    /// away); marked `reaped`.
    pub fn reap(&mut self, now: Millis, max_age: Millis, out: &mut Vec<Output>) {
        let stale: Vec<String> = self
            .calls
            .values()
            .filter(|c| now - c.last_event > max_age)
            .map(|c| c.key.clone())
            .collect();
        for key in stale {
            self.close_call(&key, now, out);
        }
    }

    /// After a reconnect: `alive` are the Uniqueids Asterisk still has (CoreShowChannels).
    /// Channels we know that are gone hung up while we were away; their calls are closed
    /// (marked `reaped`) once no channel is left.
    pub fn resync(&mut self, alive: &HashSet<String>, now: Millis, out: &mut Vec<Output>) {
        let gone: Vec<String> = self
            .channels
            .keys()
            .filter(|u| !alive.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(call) = self
                .channels
                .get(&uid)
                .and_then(|c| self.calls.get_mut(&c.call))
            {
                call.reaped = true;
            }
            self.remove_channel(&uid, now);
        }
        // Nothing more will come for them: finish now.
        self.tick(now + GRACE, out);
    }

    fn close_call(&mut self, key: &str, now: Millis, out: &mut Vec<Output>) {
        let Some(call) = self.calls.get_mut(key) else {
            return;
        };
        call.reaped = true;
        let uids: Vec<String> = call.live.iter().cloned().collect();
        for uid in uids {
            self.remove_channel(&uid, now);
        }
        if let Some(call) = self.calls.remove(key) {
            self.finish(call, out);
        }
        if let Some(call) = self.closing_calls.remove(key) {
            self.finish(call, out);
        }
    }

    fn finish(&mut self, mut call: Call, out: &mut Vec<Output>) {
        for t in call.talk.iter_mut().filter(|t| t.end.is_none()) {
            t.end = Some(call.last_hangup);
        }
        // Time either party of a segment spent on hold.
        for t in call.talk.iter_mut() {
            let end = t.end.unwrap_or(t.start);
            t.hold_ms = call
                .holds
                .iter()
                .filter(|(u, _, _)| *u == t.customer_channel || *u == t.extension_channel)
                .map(|(_, from, until)| {
                    (until.unwrap_or(end).min(end) - (*from).max(t.start)).max(0)
                })
                .sum();
        }
        // Drop blips shorter than 100 ms (event ordering during transfers).
        // (Only when real conversation exists besides them: a replay at full speed has only blips.)
        let real = |t: &TalkSegment| t.end.unwrap_or(t.start) - t.start >= 100;
        if call.talk.iter().any(real) {
            call.talk.retain(real);
        }
        let direction = if call.inbound {
            Direction::In
        } else if call.customer.is_some() || call.originated || call.click_to_call.is_some() {
            Direction::Out
        } else {
            Direction::Internal
        };
        // Segments where the caller stood in for a customer count only for internal calls.
        let key = call.key.clone();
        let customer = call.customer.clone();
        call.talk.retain(|t| match direction {
            Direction::Internal => t.customer_channel == key,
            _ => t.customer_channel != key || customer.as_deref() == Some(key.as_str()),
        });
        let end = match direction {
            Direction::Internal => call.last_hangup,
            _ => call.customer_end.unwrap_or(call.last_hangup),
        };
        let answer = call.talk.first().map(|t| t.start);
        let answered = answer.is_some();
        let customer_number = match direction {
            Direction::Out => call
                .customer_number
                .clone()
                .or_else(|| call.click_to_call.as_ref().map(|c| c.phone.clone()))
                .or_else(|| call.originate_exten.clone()),
            Direction::In => call.customer_number.clone(),
            Direction::Internal => call.root_extension.clone(),
        };
        let outcome = if answered {
            Outcome::Answered
        } else {
            self.unanswered_outcome(&call, direction)
        };
        let final_extension = call.talk.last().map(|t| t.extension.clone());
        let answered_by = call.talk.first().map(|t| t.extension.clone());
        // An unanswered inbound call is credited by the pipeline (`calls.missed_owner`), the
        // same way for every source.
        let code = match direction {
            Direction::In => final_extension.clone(),
            Direction::Out => final_extension.clone().or_else(|| call.placed_by.clone()),
            Direction::Internal => call.root_extension.clone(),
        };
        let (from_number, to_number) = match direction {
            Direction::In => (customer_number.clone(), call.did.clone()),
            Direction::Out => (
                call.placed_by
                    .clone()
                    .or_else(|| call.root_extension.clone()),
                customer_number.clone(),
            ),
            Direction::Internal => (
                call.root_extension.clone(),
                call.rings
                    .first()
                    .map(|r| r.extension.clone())
                    .or_else(|| answered_by.clone()),
            ),
        };
        let kind = match direction {
            Direction::Internal if call.root_extension.is_none() => ChannelKind::Unknown,
            d => ChannelKind::from(d),
        };
        let main_channel = call.main_channel.clone().map(|m| MainChannel { kind, ..m });
        let conversations = conversations(&call, end);
        let record = CallRecord {
            external_id: format!("{}-{}", self.system_id, call.key),
            linkedid: call.key.clone(),
            direction,
            customer_number: customer_number.unwrap_or_default(),
            did: call.did.clone(),
            code,
            user_id: call.click_to_call.as_ref().map(|c| c.user_id),
            external_phone: call
                .click_to_call
                .as_ref()
                .and_then(|c| c.external_phone.clone())
                .or_else(|| match direction {
                    Direction::In => call.did.clone(),
                    _ => call.external_line.clone(),
                }),
            start: call.start,
            answer,
            end,
            wait_seconds: ms_to_secs(answer.unwrap_or(end) - call.start),
            talk_seconds: answer.map_or(0, |a| ms_to_secs(end - a)),
            connected_seconds: ms_to_secs(
                call.talk
                    .iter()
                    .map(|t| t.end.unwrap_or(t.start) - t.start - t.hold_ms)
                    .sum::<Millis>()
                    .max(0),
            ),
            outcome,
            answered_by,
            final_extension,
            placed_by: call.placed_by.clone(),
            click_to_call: call.click_to_call.is_some(),
            rings: call.rings.clone(),
            talk: call.talk.clone(),
            recordings: call.recordings.clone(),
            customer_dial_status: call.customer_dial_status.clone(),
            reaped: call.reaped,
            trunk: call.trunk.clone(),
            phone_original: None,
            registration: None,
            ignored: false,
            main_channel,
            conversations,
            from_number,
            to_number,
        };
        out.push(Output::Live(LiveEvent::Hangup {
            external_id: record.external_id.clone(),
            phone: record.customer_number.clone(),
            direction,
            codes: record.hangup_codes(),
            outcome,
        }));
        out.push(Output::Finished(Box::new(record)));
    }

    fn unanswered_outcome(&self, call: &Call, direction: Direction) -> Outcome {
        let from_status = |s: &str| match s {
            "BUSY" => Some(Outcome::Busy),
            "CONGESTION" | "CHANUNAVAIL" | "INVALIDARGS" => Some(Outcome::Failed),
            "DONTCALL" | "TORTURE" => Some(Outcome::NotAllowed),
            "NOANSWER" | "CANCEL" | "ANSWER" => Some(Outcome::NoAnswer),
            _ => None,
        };
        if direction == Direction::Out {
            if let Some(o) = call.customer_dial_status.as_deref().and_then(from_status) {
                return o;
            }
            let from_cause = match call.customer_cause.as_deref() {
                Some("17") => Some(Outcome::Busy),
                Some("21") => Some(Outcome::NotAllowed),
                Some("1" | "3" | "27" | "34" | "38" | "41" | "42") => Some(Outcome::Failed),
                Some("18" | "19") => Some(Outcome::NoAnswer),
                _ => None,
            };
            if let Some(o) = from_cause.filter(|_| call.customer.is_some()) {
                return o;
            }
            if call.customer.is_none()
                && call.originate_failed
                && call.rings.iter().all(|r| r.status.is_none())
                && call.rings.is_empty()
            {
                return Outcome::Failed;
            }
        }
        let statuses: Vec<Outcome> = call
            .rings
            .iter()
            .filter_map(|r| r.status.as_deref().and_then(from_status))
            .collect();
        if !statuses.is_empty() && statuses.iter().all(|s| *s == Outcome::Busy) {
            return Outcome::Busy;
        }
        if !statuses.is_empty() && statuses.iter().all(|s| *s == Outcome::Failed) {
            return Outcome::Failed;
        }
        Outcome::NoAnswer
    }

    /// Snapshot for `/ready` and debugging: live calls by key with their channel count.
    pub fn summary(&self) -> BTreeMap<String, usize> {
        self.calls
            .iter()
            .map(|(k, c)| (k.clone(), c.live.len()))
            .collect()
    }
}

/// The conversations of a finished call (its talk segments already final): one per ring, named
/// by the phone it reached and joined with the talk of any channel of that ring; one per
/// channel that talked without this call ringing it (a transfer target rung by another call, a
/// pick-up from a parking lot); one per parking span.
fn conversations(call: &Call, end: Millis) -> Vec<Conversation> {
    let name = |uid: &str| call.channel_names.get(uid).cloned().unwrap_or_default();
    // (ring index, conversation); rings come first so their index is their position.
    let mut legs: Vec<(Option<usize>, Conversation)> = call
        .rings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // The phone rung: the last hop of a Local chain (a queue dials a Local half, which
            // dials the phone), a real phone rather than a Local half.
            let channel = call
                .ring_by_dest
                .iter()
                .filter(|(_, &j)| j == i)
                .map(|(d, _)| d)
                .max_by_key(|d| (!name(d).starts_with("Local/"), uniqueid_order(d)))
                .cloned()
                .unwrap_or_default();
            let conversation = Conversation {
                channel_name: name(&channel),
                channel,
                customer_channel: String::new(),
                extension: Some(r.extension.clone()),
                start: r.start,
                answer: None,
                end: r.end,
                parked: false,
            };
            (Some(i), conversation)
        })
        .collect();
    for t in &call.talk {
        let ring = call.ring_by_dest.get(&t.extension_channel).copied();
        let found = legs.iter_mut().find(|(i, c)| match ring {
            Some(r) => *i == Some(r),
            None => i.is_none() && !c.parked && c.channel == t.extension_channel,
        });
        match found {
            Some((_, c)) if c.answer.is_none() => {
                c.customer_channel = t.customer_channel.clone();
                c.start = c.start.min(t.start);
                c.answer = Some(t.start);
                c.end = t.end;
            }
            Some((_, c)) => c.end = c.end.max(t.end),
            None => legs.push((
                None,
                Conversation {
                    channel: t.extension_channel.clone(),
                    channel_name: name(&t.extension_channel),
                    customer_channel: t.customer_channel.clone(),
                    extension: Some(t.extension.clone()),
                    start: t.start,
                    answer: Some(t.start),
                    end: t.end,
                    parked: false,
                },
            )),
        }
    }
    legs.extend(call.parks.iter().map(|p| {
        (
            None,
            Conversation {
                channel: p.channel.clone(),
                channel_name: p.name.clone(),
                customer_channel: String::new(),
                extension: None,
                start: p.from,
                answer: None,
                end: Some(p.until.unwrap_or(end).max(p.from)),
                parked: true,
            },
        )
    }));
    let mut out: Vec<Conversation> = legs.into_iter().map(|(_, c)| c).collect();
    out.sort_by_key(|c| c.start);
    out
}

/// `1795264605.56` → (1795264605, 56): the order Asterisk created channels in.
fn uniqueid_order(uid: &str) -> (u64, u64) {
    let (secs, seq) = uid.split_once('.').unwrap_or((uid, ""));
    (secs.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// `Local/199@internal-0000000f;1` → `Local/199@internal`; `PJSIP/101-0000001f` → `PJSIP/101`;
/// a name without a sequence suffix is returned as is.
fn base_name(name: &str) -> &str {
    let name = name.split(';').next().unwrap_or(name);
    match name.rsplit_once('-') {
        Some((base, seq))
            if !seq.is_empty()
                && seq.bytes().all(|b| b.is_ascii_hexdigit())
                && name.contains('/') =>
        {
            base
        }
        _ => name,
    }
}

/// `Duration: 01:02:03` (CoreShowChannel) → milliseconds.
fn parse_hms(s: &str) -> Option<Millis> {
    let mut secs: i64 = 0;
    for part in s.trim().split(':') {
        secs = secs
            .checked_mul(60)?
            .checked_add(part.parse::<i64>().ok()?)?;
    }
    Some(secs.saturating_mul(1000))
}

fn ms_to_secs(ms: Millis) -> u64 {
    u64::try_from((ms + 500) / 1000).unwrap_or(0)
}

/// `Timestamp: 1795264458.556255` (timestampevents=yes) → milliseconds.
fn parse_timestamp(s: &str) -> Option<Millis> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
    let secs: i64 = secs.parse().ok()?;
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    Some(secs * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn chan(
        event: &str,
        name: &str,
        uid: &str,
        linkedid: &str,
        ctx: &str,
        exten: &str,
        extra: &[(&str, &str)],
    ) -> Frame {
        let mut pairs = vec![
            ("Event", event.to_string()),
            ("Channel", name.to_string()),
            ("CallerIDNum", "+79990001122".to_string()),
            ("Context", ctx.to_string()),
            ("Exten", exten.to_string()),
            ("Uniqueid", uid.to_string()),
            ("Linkedid", linkedid.to_string()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        Frame::from_pairs(pairs)
    }

    fn dial(
        event: &str,
        caller: (&str, &str),
        dest: (&str, &str),
        linkedid: &str,
        extra: &[(&str, &str)],
    ) -> Frame {
        let mut pairs = vec![
            ("Event", event.to_string()),
            ("Channel", caller.0.to_string()),
            ("Uniqueid", caller.1.to_string()),
            ("Linkedid", linkedid.to_string()),
            ("DestChannel", dest.0.to_string()),
            ("DestUniqueid", dest.1.to_string()),
            ("DestLinkedid", linkedid.to_string()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        Frame::from_pairs(pairs)
    }

    fn model() -> CallModel {
        let mut c = Config::default();
        c.calls.inbound_contexts = vec!["from-trunk".into()];
        CallModel::new(Classifier::new(&c), "t")
    }

    fn finished(out: &[Output]) -> Vec<&CallRecord> {
        out.iter()
            .filter_map(|o| {
                if let Output::Finished(r) = o {
                    Some(&**r)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn hold_time_is_not_conversation() {
        let (trunk, phone) = (("PJSIP/trunk-01", "1.1"), ("PJSIP/101-02", "1.2"));
        let mut m = model();
        let mut out = Vec::new();
        let s = 1_000_000;
        m.on_event(
            &chan(
                "Newchannel",
                trunk.0,
                trunk.1,
                "1.1",
                "from-trunk",
                "+74951234567",
                &[],
            ),
            s,
            &mut out,
        );
        m.on_event(
            &chan("Newchannel", phone.0, phone.1, "1.1", "internal", "s", &[]),
            s + 10,
            &mut out,
        );
        m.on_event(
            &dial(
                "DialBegin",
                trunk,
                phone,
                "1.1",
                &[("DialString", "PJSIP/101")],
            ),
            s + 20,
            &mut out,
        );
        m.on_event(
            &dial("DialEnd", trunk, phone, "1.1", &[("DialStatus", "ANSWER")]),
            s + 3_000,
            &mut out,
        );
        for (name, uid) in [trunk, phone] {
            m.on_event(
                &chan(
                    "BridgeEnter",
                    name,
                    uid,
                    "1.1",
                    "",
                    "",
                    &[("BridgeUniqueid", "b1")],
                ),
                s + 3_000,
                &mut out,
            );
        }
        m.on_event(
            &chan("Hold", phone.0, phone.1, "1.1", "", "", &[]),
            s + 13_000,
            &mut out,
        );
        m.on_event(
            &chan("Unhold", phone.0, phone.1, "1.1", "", "", &[]),
            s + 23_000,
            &mut out,
        );
        for (name, uid) in [trunk, phone] {
            m.on_event(
                &chan(
                    "BridgeLeave",
                    name,
                    uid,
                    "1.1",
                    "",
                    "",
                    &[("BridgeUniqueid", "b1")],
                ),
                s + 33_000,
                &mut out,
            );
            m.on_event(
                &chan("Hangup", name, uid, "1.1", "", "", &[("Cause", "16")]),
                s + 33_000,
                &mut out,
            );
        }
        m.flush(&mut out);
        let r = finished(&out)[0];
        assert_eq!(
            (r.direction, r.did.as_deref(), r.customer_number.as_str()),
            (Direction::In, Some("+74951234567"), "+79990001122")
        );
        assert_eq!(
            (r.wait_seconds, r.talk_seconds, r.connected_seconds),
            (3, 30, 20)
        );
        assert_eq!(r.talk[0].hold_ms, 10_000);
        assert_eq!(r.external_id, "t-1.1");
    }

    #[test]
    fn a_busy_customer_without_dial_end_is_busy_from_the_hangup_cause() {
        let (phone, trunk) = (("PJSIP/101-01", "2.1"), ("PJSIP/trunk-02", "2.2"));
        let mut m = model();
        let mut out = Vec::new();
        m.on_event(
            &chan(
                "Newchannel",
                phone.0,
                phone.1,
                "2.1",
                "internal",
                "89991234567",
                &[],
            ),
            0,
            &mut out,
        );
        m.on_event(
            &chan(
                "Newchannel",
                trunk.0,
                trunk.1,
                "2.1",
                "from-trunk",
                "s",
                &[],
            ),
            10,
            &mut out,
        );
        m.on_event(
            &dial(
                "DialBegin",
                phone,
                trunk,
                "2.1",
                &[("DialString", "9991234567@trunk")],
            ),
            20,
            &mut out,
        );
        m.on_event(
            &chan(
                "Hangup",
                trunk.0,
                trunk.1,
                "2.1",
                "",
                "",
                &[("Cause", "17")],
            ),
            2_000,
            &mut out,
        );
        m.on_event(
            &chan(
                "Hangup",
                phone.0,
                phone.1,
                "2.1",
                "",
                "",
                &[("Cause", "17")],
            ),
            2_100,
            &mut out,
        );
        m.flush(&mut out);
        let r = finished(&out)[0];
        assert_eq!(
            (r.direction, r.customer_number.as_str(), r.code.as_deref()),
            (Direction::Out, "9991234567", Some("101"))
        );
        assert_eq!(r.outcome, Outcome::Busy);
        // A live `out` event announced the dialling extension.
        assert!(out.iter().any(|o| matches!(o, Output::Live(LiveEvent::Dialing { codes, .. }) if codes == &vec!["101".to_string()])));
    }

    #[test]
    fn an_outbound_calls_line_is_the_caller_id_its_trunk_leg_presented() {
        let (phone, trunk) = (("PJSIP/101-01", "5.1"), ("PJSIP/trunk-02", "5.2"));
        let run = |presented: &str| {
            let mut m = model();
            let mut out = Vec::new();
            m.on_event(
                &chan(
                    "Newchannel",
                    phone.0,
                    phone.1,
                    "5.1",
                    "internal",
                    "89991234567",
                    &[],
                ),
                0,
                &mut out,
            );
            // A dialled channel's caller ID is the party it calls.
            m.on_event(
                &chan("Newchannel", trunk.0, trunk.1, "5.1", "outbound", "s", &[]),
                10,
                &mut out,
            );
            m.on_event(
                &dial(
                    "DialBegin",
                    phone,
                    trunk,
                    "5.1",
                    &[
                        ("DialString", "9991234567@trunk"),
                        ("DestCallerIDNum", "9991234567"),
                        ("DestConnectedLineNum", presented),
                    ],
                ),
                20,
                &mut out,
            );
            for (n, u) in [trunk, phone] {
                m.on_event(
                    &chan("Hangup", n, u, "5.1", "", "", &[("Cause", "17")]),
                    900,
                    &mut out,
                );
            }
            m.flush(&mut out);
            finished(&out)[0].external_phone.clone()
        };
        assert_eq!(run("+74951234567").as_deref(), Some("+74951234567"));
        // The extension's own number is not a line; nor is the customer's number ever one.
        assert_eq!(run("101"), None);
    }

    #[test]
    fn channels_asterisk_shows_bridged_after_a_gap_are_talking() {
        let (trunk, phone) = (("PJSIP/trunk-01", "6.1"), ("PJSIP/101-02", "6.2"));
        let mut m = model();
        let mut out = Vec::new();
        m.on_event(
            &chan(
                "Newchannel",
                trunk.0,
                trunk.1,
                "6.1",
                "from-trunk",
                "+74951234567",
                &[],
            ),
            0,
            &mut out,
        );
        m.on_event(
            &chan("Newchannel", phone.0, phone.1, "6.1", "internal", "s", &[]),
            10,
            &mut out,
        );
        m.on_event(&dial("DialBegin", trunk, phone, "6.1", &[]), 20, &mut out);
        // The answer happened while the link was down; CoreShowChannels shows the bridge.
        for (name, uid) in [trunk, phone] {
            let row = chan(
                "CoreShowChannel",
                name,
                uid,
                "6.1",
                "",
                "",
                &[("BridgeId", "b9"), ("Duration", "00:00:09")],
            );
            m.show_channel(&row, 9_000);
        }
        for (name, uid) in [trunk, phone] {
            m.on_event(
                &chan("Hangup", name, uid, "6.1", "", "", &[]),
                19_000,
                &mut out,
            );
        }
        m.flush(&mut out);
        let r = finished(&out)[0];
        assert_eq!(
            (r.outcome, r.answered_by.as_deref(), r.talk_seconds),
            (Outcome::Answered, Some("101"), 10)
        );
    }

    #[test]
    fn an_answer_is_never_downgraded_by_a_losing_legs_cancel() {
        let (trunk, a, b) = (
            ("PJSIP/trunk-01", "3.1"),
            ("PJSIP/101-02", "3.2"),
            ("PJSIP/102-03", "3.3"),
        );
        let mut m = model();
        let mut out = Vec::new();
        m.on_event(
            &chan(
                "Newchannel",
                trunk.0,
                trunk.1,
                "3.1",
                "from-trunk",
                "+7495",
                &[],
            ),
            0,
            &mut out,
        );
        for x in [a, b] {
            m.on_event(
                &chan("Newchannel", x.0, x.1, "3.1", "internal", "s", &[]),
                1,
                &mut out,
            );
            m.on_event(&dial("DialBegin", trunk, x, "3.1", &[]), 2, &mut out);
        }
        m.on_event(
            &dial("DialEnd", trunk, a, "3.1", &[("DialStatus", "ANSWER")]),
            1_000,
            &mut out,
        );
        // Queues send CANCEL twice for the loser, and a stray CANCEL for the winner must not count.
        m.on_event(
            &dial("DialEnd", trunk, b, "3.1", &[("DialStatus", "CANCEL")]),
            1_001,
            &mut out,
        );
        m.on_event(
            &dial("DialEnd", trunk, b, "3.1", &[("DialStatus", "CANCEL")]),
            1_002,
            &mut out,
        );
        m.on_event(
            &dial("DialEnd", trunk, a, "3.1", &[("DialStatus", "CANCEL")]),
            1_003,
            &mut out,
        );
        for (n, u) in [trunk, a] {
            m.on_event(
                &chan(
                    "BridgeEnter",
                    n,
                    u,
                    "3.1",
                    "",
                    "",
                    &[("BridgeUniqueid", "b")],
                ),
                1_010,
                &mut out,
            );
        }
        for (n, u) in [b, trunk, a] {
            m.on_event(&chan("Hangup", n, u, "3.1", "", "", &[]), 5_000, &mut out);
        }
        m.flush(&mut out);
        let r = finished(&out)[0];
        let rings: Vec<(&str, Option<&str>)> = r
            .rings
            .iter()
            .map(|x| (x.extension.as_str(), x.status.as_deref()))
            .collect();
        assert_eq!(
            rings,
            vec![("101", Some("ANSWER")), ("102", Some("CANCEL"))]
        );
        assert_eq!(
            (r.outcome, r.answered_by.as_deref()),
            (Outcome::Answered, Some("101"))
        );
    }

    /// Capture-free parking: the customer talks with 101, is parked on 701, and 102 (a call of
    /// its own, dialling 701) picks it up. `park` false leaves the parking events out.
    fn parked_call(park: bool) -> Vec<CallRecord> {
        let (trunk, a, b) = (
            ("PJSIP/trunk-01", "7.1"),
            ("PJSIP/101-02", "7.2"),
            ("PJSIP/102-03", "7.3"),
        );
        let parkee = |event: &str, extra: &[(&str, &str)]| {
            let mut pairs = vec![
                ("Event", event.to_string()),
                ("ParkeeChannel", trunk.0.to_string()),
                ("ParkeeChannelState", "6".to_string()),
                ("ParkeeCallerIDNum", "+79990001122".to_string()),
                ("ParkeeUniqueid", trunk.1.to_string()),
                ("ParkeeLinkedid", "7.1".to_string()),
                ("ParkerChannel", a.0.to_string()),
                ("ParkerDialString", "PJSIP/101".to_string()),
                ("Parkinglot", "default".to_string()),
                ("ParkingSpace", "701".to_string()),
            ];
            pairs.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
            Frame::from_pairs(pairs)
        };
        let bridge = |event: &str, (n, u): (&str, &str), linkedid: &str, id: &str| {
            chan(event, n, u, linkedid, "", "", &[("BridgeUniqueid", id)])
        };
        let mut frames: Vec<(Millis, Frame)> = vec![
            (
                0,
                chan(
                    "Newchannel",
                    trunk.0,
                    trunk.1,
                    "7.1",
                    "from-trunk",
                    "+74951234567",
                    &[],
                ),
            ),
            (
                10,
                chan("Newchannel", a.0, a.1, "7.1", "internal", "s", &[]),
            ),
            (20, dial("DialBegin", trunk, a, "7.1", &[])),
            (
                3_000,
                dial("DialEnd", trunk, a, "7.1", &[("DialStatus", "ANSWER")]),
            ),
            (
                3_000,
                chan(
                    "Newstate",
                    trunk.0,
                    trunk.1,
                    "7.1",
                    "",
                    "",
                    &[("ChannelState", "6")],
                ),
            ),
            (3_000, bridge("BridgeEnter", trunk, "7.1", "b1")),
            (3_000, bridge("BridgeEnter", a, "7.1", "b1")),
            (10_000, bridge("BridgeLeave", trunk, "7.1", "b1")),
            (
                10_000,
                bridge("BridgeEnter", trunk, "7.1", "parking-default"),
            ),
            (10_000, parkee("ParkedCall", &[("ParkingTimeout", "45")])),
            (10_010, bridge("BridgeLeave", a, "7.1", "b1")),
            (
                10_010,
                chan("Hangup", a.0, a.1, "7.1", "", "", &[("Cause", "16")]),
            ),
            (
                20_000,
                chan("Newchannel", b.0, b.1, "7.3", "internal", "701", &[]),
            ),
            (
                20_010,
                parkee(
                    "UnParkedCall",
                    &[("RetrieverChannel", b.0), ("RetrieverUniqueid", b.1)],
                ),
            ),
            (
                20_010,
                bridge("BridgeLeave", trunk, "7.1", "parking-default"),
            ),
            (20_020, bridge("BridgeEnter", trunk, "7.1", "b2")),
            // Bridged, the retriever takes the older Linkedid.
            (20_020, bridge("BridgeEnter", b, "7.1", "b2")),
            (50_000, bridge("BridgeLeave", trunk, "7.1", "b2")),
            (
                50_000,
                chan(
                    "Hangup",
                    trunk.0,
                    trunk.1,
                    "7.1",
                    "",
                    "",
                    &[("Cause", "16")],
                ),
            ),
            (50_000, bridge("BridgeLeave", b, "7.1", "b2")),
            (
                50_000,
                chan("Hangup", b.0, b.1, "7.1", "", "", &[("Cause", "16")]),
            ),
        ];
        if !park {
            frames.retain(|(_, f)| !f.event().is_some_and(|e| e.contains("Park")));
        }
        let mut m = model();
        let mut out = Vec::new();
        for (at, f) in &frames {
            m.on_event(f, 1_000_000 + at, &mut out);
        }
        m.flush(&mut out);
        finished(&out).into_iter().cloned().collect()
    }

    #[test]
    fn a_parked_call_has_a_parked_conversation_between_its_two_extensions() {
        let records = parked_call(true);
        let r = records.iter().find(|r| r.linkedid == "7.1").unwrap();
        assert_eq!(
            (
                r.outcome,
                r.answered_by.as_deref(),
                r.final_extension.as_deref()
            ),
            (Outcome::Answered, Some("101"), Some("102"))
        );
        let got: Vec<_> = r
            .conversations
            .iter()
            .map(|c| {
                (
                    c.extension.as_deref(),
                    c.channel.as_str(),
                    c.start - 1_000_000,
                    c.answer.map(|t| t - 1_000_000),
                    c.end.map(|t| t - 1_000_000),
                    c.parked,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("101"), "7.2", 20, Some(3_000), Some(10_000), false),
                (None, "7.1", 10_000, None, Some(20_010), true),
                (
                    Some("102"),
                    "7.3",
                    20_020,
                    Some(20_020),
                    Some(50_000),
                    false
                ),
            ]
        );
        assert_eq!(r.conversations[1].channel_name, "PJSIP/trunk-01");
        let main = r.main_channel.as_ref().unwrap();
        assert_eq!(
            (main.id.as_str(), main.answer, main.end),
            ("7.1", Some(1_003_000), Some(1_050_000))
        );
        assert_eq!(r.conversations[2].customer_channel, "7.1");
    }

    #[test]
    fn parking_events_change_nothing_but_the_parked_conversation() {
        let with = parked_call(true);
        let without = parked_call(false);
        assert_eq!(with.len(), without.len());
        for (w, o) in with.iter().zip(&without) {
            let mut w = w.clone();
            w.conversations.retain(|c| !c.parked);
            assert_eq!(&w, o);
        }
        assert!(with
            .iter()
            .any(|r| r.conversations.iter().any(|c| c.parked)));
    }

    #[test]
    fn a_parked_channel_we_never_saw_is_ignored() {
        let mut m = model();
        let mut out = Vec::new();
        let f = Frame::from_pairs(vec![
            ("Event", "ParkedCall".to_string()),
            ("ParkeeChannel", "PJSIP/trunk-09".to_string()),
            ("ParkeeUniqueid", "9.1".to_string()),
            ("ParkeeLinkedid", "9.1".to_string()),
        ]);
        m.on_event(&f, 0, &mut out);
        assert_eq!((m.live_calls(), m.live_channels()), (0, 0));
    }
}
