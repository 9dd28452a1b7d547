//! Configuration: built-in defaults < TOML file < `PBXGATE__<SECTION>__<KEY>` environment variables.
//!
//! Unknown keys are errors, wherever they come from. After loading, every value is validated and
//! all problems are reported together, one line each, naming the key (`crm.url: ...`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError, ValidationErrors, ValidationErrorsKind};

use crate::base::secret::Secret;

/// Prefix of environment variables that override the file: `PBXGATE__CRM__API_KEY`.
pub const ENV_PREFIX: &str = "PBXGATE__";
/// The file read when `--config` is not given; a missing default file means "built-in defaults".
pub const DEFAULT_PATH: &str = "config.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[validate(nested)]
    pub http: HttpConfig,
    #[validate(nested)]
    pub crm: CrmConfig,
    #[validate(nested)]
    pub ami: AmiConfig,
    #[validate(nested)]
    pub pbx: PbxConfig,
    #[validate(nested)]
    pub calls: CallsConfig,
    #[validate(nested)]
    pub click_to_call: ClickToCallConfig,
    #[validate(nested)]
    pub manager_status: ManagerStatusConfig,
    #[validate(nested)]
    pub history: HistoryConfig,
    #[validate(nested)]
    pub phone: PhoneConfig,
    #[validate(nested)]
    pub routing: RoutingConfig,
    #[validate(nested)]
    pub records: RecordsConfig,
    #[validate(nested)]
    pub storage: StorageConfig,
    #[validate(nested)]
    pub backfill: BackfillConfig,
    #[validate(nested)]
    pub log: LogConfig,
    /// CRM user ↔ extension (sent as `additionalCodes`).
    #[validate(nested)]
    pub users: Vec<UserCode>,
    /// Shop ↔ external number (sent as `externalPhones`).
    #[validate(nested)]
    pub external_phones: Vec<ExternalPhone>,
    /// Which calls reach the CRM: evaluated in order, the first match wins, default register.
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    #[validate(custom(function = "socket_addr"))]
    pub listen: String,
    /// The address retailCRM uses to reach us; every URL we register is built from it.
    #[validate(custom(function = "http_url"))]
    pub public_url: String,
    /// Largest request body accepted on any endpoint.
    #[validate(range(
        min = 1024,
        max = 16777216,
        message = "must be between 1024 and 16777216 bytes"
    ))]
    pub max_body_bytes: usize,
    /// Time a client has to send a request's head, and then again its body; a connection that
    /// is slower is closed (after a 408 where the protocol allows one).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "client_timeout"))]
    pub client_timeout: Duration,
    /// Most connections open at once; lowered at start to fit the open-files limit.
    #[validate(range(min = 1, max = 1000000, message = "must be between 1 and 1000000"))]
    pub max_connections: usize,
    /// Most connections open at once from one client address; 0 = no limit per address.
    #[validate(range(max = 1000000, message = "must be at most 1000000"))]
    pub max_connections_per_ip: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8088".into(),
            public_url: "http://127.0.0.1:8088".into(),
            max_body_bytes: 64 * 1024,
            client_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CrmConfig {
    #[validate(custom(function = "http_url"))]
    pub url: String,
    /// Empty: the CRM is not contacted (the service still runs, records and queues).
    pub api_key: Secret,
    #[validate(custom(function = "module_code"))]
    pub module_code: String,
    #[validate(length(min = 1, max = 255, message = "must be 1 to 255 characters"))]
    pub module_name: String,
    /// Empty: generated once and kept in the store.
    #[validate(custom(function = "client_id"))]
    pub client_id: Secret,
    pub site: String,
    pub register_on_start: bool,
    /// The account's time zone for call dates (e.g. `Europe/Moscow`); empty = ask the CRM.
    #[validate(custom(function = "timezone"))]
    pub timezone: String,
    /// `false`: the module's settings can be changed only through the API.
    pub allow_edit: bool,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub timeout: Duration,
    /// Requests per second per API key, general routes.
    #[validate(range(min = 1, max = 1000, message = "must be between 1 and 1000"))]
    pub rps: u32,
    /// Requests per second per API key, `/api/v5/telephony/*`.
    #[validate(range(min = 1, max = 1000, message = "must be between 1 and 1000"))]
    pub telephony_rps: u32,
    /// Retries after the first attempt for 503/429/5xx/timeouts.
    #[validate(range(max = 20, message = "must be at most 20"))]
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_max: Duration,
}

impl Default for CrmConfig {
    fn default() -> Self {
        CrmConfig {
            url: "https://example.retailcrm.ru".into(),
            api_key: Secret::default(),
            module_code: "pbxgate".into(),
            module_name: "pbxgate".into(),
            client_id: Secret::default(),
            site: String::new(),
            register_on_start: true,
            timezone: String::new(),
            allow_edit: false,
            timeout: Duration::from_secs(10),
            rps: 10,
            telephony_rps: 40,
            max_retries: 4,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmiAuth {
    /// `Login` with `Secret`.
    #[default]
    Plain,
    /// `Challenge` then `Login` with `Key = md5(challenge + secret)`: the secret never crosses the wire.
    Md5,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct AmiConfig {
    #[validate(length(min = 1, max = 255, message = "must not be empty"))]
    pub host: String,
    #[validate(range(min = 1, message = "must be between 1 and 65535"))]
    pub port: u16,
    #[validate(length(min = 1, max = 80, message = "must be 1 to 80 characters"))]
    pub username: String,
    pub secret: Secret,
    pub auth: AmiAuth,
    /// The `Events:` value at login: `on`, `off`, or a class list such as `call,agent,cdr,system`.
    #[validate(custom(function = "ami_events"))]
    pub events: String,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub connect_timeout: Duration,
    /// Time allowed for Asterisk to answer an action.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub action_timeout: Duration,
    /// Keepalive: a `Ping` this often; no answer within `ping_timeout` means the link is dead.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub ping_timeout: Duration,
    /// Reconnect backoff: exponential with jitter between these bounds.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub reconnect_max: Duration,
    /// Events buffered per subscriber before it is told it lagged.
    #[validate(range(min = 16, max = 1048576, message = "must be between 16 and 1048576"))]
    pub event_buffer: usize,
    /// Events that may wait for the call tracker (about 1 KB each). Below this nothing is
    /// dropped, however fast Asterisk sends; past it events are dropped until half of it is
    /// handled, then the calls are resynced.
    #[validate(range(
        min = 1000,
        max = 50000000,
        message = "must be between 1000 and 50000000"
    ))]
    pub max_backlog: usize,
    /// Context where managers' extensions are dialled (`{context}` in `originate_channel`).
    #[validate(custom(function = "dialplan_name"))]
    pub internal_context: String,
    /// Context where the customer's number is dialled.
    #[validate(custom(function = "dialplan_name"))]
    pub outbound_context: String,
    /// The manager's leg of a click-to-call: `{code}` is the extension, `{context}` the
    /// internal context. E.g. `Local/{code}@{context}` or `PJSIP/{code}`.
    #[validate(custom(function = "channel_template"))]
    pub originate_channel: String,
    /// How long the manager's phone rings before the click-to-call gives up.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub originate_timeout: Duration,
}

impl Default for AmiConfig {
    fn default() -> Self {
        AmiConfig {
            host: "127.0.0.1".into(),
            port: 5038,
            username: "pbxgate".into(),
            secret: Secret::default(),
            auth: AmiAuth::Plain,
            events: "on".into(),
            connect_timeout: Duration::from_secs(5),
            action_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            event_buffer: 8192,
            max_backlog: 1_000_000,
            internal_context: "from-internal".into(),
            outbound_context: "from-internal".into(),
            originate_channel: "Local/{code}@{context}".into(),
            originate_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct PbxConfig {
    /// Names this PBX in call ids (`<system_id>-<linkedid>`), so ids stay unique across PBXs.
    #[validate(custom(function = "module_code"))]
    pub system_id: String,
    /// Bearer token a PBX presents to post call events (`/pbx/events`); empty = endpoint off.
    #[validate(custom(function = "token"))]
    pub token: Secret,
}

impl Default for PbxConfig {
    fn default() -> Self {
        PbxConfig {
            system_id: "pbx".into(),
            token: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Dialplan contexts where calls from the carrier enter.
    pub inbound_contexts: Vec<String>,
    /// Endpoints (PJSIP/<endpoint>-...) that are carrier trunks.
    pub trunk_endpoints: Vec<String>,
    /// What an internal extension looks like (a regular expression).
    #[validate(custom(function = "regex_pattern"))]
    pub extension_pattern: String,
    /// Calls with no event for this long are closed by the reaper (their channels vanished).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub max_silence: Duration,
    /// Send extension-to-extension calls to the CRM too (as outgoing calls of the caller).
    pub send_internal: bool,
    /// A live event (pop-up) not delivered within this time is dropped.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub live_event_deadline: Duration,
    /// Who is credited with an inbound call that rang several extensions and nobody answered.
    pub missed_owner: MissedOwner,
    /// The manager of calls no extension touched (hung up in the IVR or a queue, an outbound
    /// call reported without its extension): an extension code, or `user:<id>`. Empty: such
    /// calls are kept locally, held, and never sent (the CRM requires a manager).
    #[validate(custom(function = "unassigned_code"))]
    pub unassigned_code: String,
    /// The company line of outbound calls when the PBX does not show the caller ID it presented:
    /// one number, or a table of trunk → number (`{ trunk = "+74951234567", "*" = "..." }`).
    #[validate(custom(function = "outbound_line"))]
    pub outbound_line: OutboundLine,
}

/// `calls.missed_owner`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedOwner {
    /// The manager routing chose for the call if that one rang, else the first that rang.
    #[default]
    Responsible,
    FirstRung,
    LastRung,
}

/// `calls.unassigned_code`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignee {
    Code(String),
    User(i64),
}

/// `calls.outbound_line`: empty, one number, or per trunk (`*` for the others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutboundLine {
    One(String),
    PerTrunk(BTreeMap<String, String>),
}

impl Default for OutboundLine {
    fn default() -> Self {
        OutboundLine::One(String::new())
    }
}

impl OutboundLine {
    /// The line for a call through `trunk` (`PJSIP/trunk`, or the bare endpoint name).
    pub fn for_trunk(&self, trunk: Option<&str>) -> Option<&str> {
        let found = match self {
            OutboundLine::One(n) => Some(n.as_str()),
            OutboundLine::PerTrunk(map) => {
                let endpoint = trunk.map(|t| t.rsplit('/').next().unwrap_or(t));
                trunk
                    .and_then(|t| map.get(t))
                    .or_else(|| endpoint.and_then(|e| map.get(e)))
                    .or_else(|| map.get("*"))
                    .map(String::as_str)
            }
        };
        found.filter(|n| !n.is_empty())
    }
}

impl CallsConfig {
    /// `unassigned_code` parsed; `None` when empty.
    pub fn unassigned(&self) -> Option<Assignee> {
        let v = self.unassigned_code.trim();
        if v.is_empty() {
            return None;
        }
        match v.strip_prefix("user:") {
            Some(id) => id.parse().ok().map(Assignee::User),
            None => Some(Assignee::Code(v.to_string())),
        }
    }
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            inbound_contexts: vec![
                "from-trunk".into(),
                "from-pstn".into(),
                "from-did-direct".into(),
                "ext-did".into(),
            ],
            trunk_endpoints: vec!["trunk".into()],
            extension_pattern: "^[0-9]{2,5}$".into(),
            max_silence: Duration::from_secs(3600),
            send_internal: false,
            live_event_deadline: Duration::from_secs(5),
            missed_owner: MissedOwner::Responsible,
            unassigned_code: String::new(),
            outbound_line: OutboundLine::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Upload shortly after each call (after `batch_window`, or at once when a batch is full).
    pub immediate: bool,
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// The scheduler uploads whatever is pending this often (drains backlogs).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub interval: Duration,
    /// Calls per `calls/upload` request (retailCRM takes at most 50).
    #[validate(range(min = 1, max = 50, message = "must be between 1 and 50"))]
    pub batch_size: usize,
    /// How long uploaded call ids are remembered (duplicates, admin view).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A recording modified within this time is still being written: its call waits.
    #[serde(with = "humantime_serde")]
    pub record_settle: Duration,
    /// ...but never longer than this.
    #[serde(with = "humantime_serde")]
    pub record_wait_max: Duration,
    /// Backoff after a failed upload (exponential with jitter between these bounds).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_max: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            immediate: true,
            batch_window: Duration::from_secs(1),
            interval: Duration::from_secs(600),
            batch_size: 50,
            retention: Duration::from_secs(7 * 24 * 3600),
            record_settle: Duration::from_secs(5),
            record_wait_max: Duration::from_secs(120),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
        }
    }
}

/// Recordings: signed links for `recordUrl` and the endpoint that serves them.
#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Where MixMonitor writes; a file outside it (after resolving symlinks) is never served.
    #[validate(custom(function = "non_empty_path"))]
    pub dir: PathBuf,
    /// HMAC key of the links. Empty: generated once and kept in the store.
    #[validate(custom(function = "token"))]
    pub secret: Secret,
    /// How long a link works after it is made (0 = forever).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "link_ttl"))]
    pub link_ttl: Duration,
    /// Recordings of calls older than this many days are no longer served (0 = forever).
    #[validate(range(max = 36500, message = "must be at most 36500"))]
    pub keep_days: u32,
    /// `""` (serve the recording as written) or `"mp3"` (convert it first).
    #[validate(custom(function = "convert_format"))]
    pub convert: String,
    /// The encoder's argv; `{input}` and `{output}` are replaced by the file paths.
    pub convert_command: Vec<String>,
    /// An encoder still running after this is killed (the original is served).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub convert_timeout: Duration,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            dir: PathBuf::from("/var/spool/asterisk/monitor"),
            secret: Secret::default(),
            link_ttl: Duration::from_secs(365 * 24 * 3600),
            keep_days: 0,
            convert: String::new(),
            convert_command: vec![
                "lame".into(),
                "--quiet".into(),
                "{input}".into(),
                "{output}".into(),
            ],
            convert_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneConfig {
    /// Our country's calling code without `+` (`7`, `49`, `1`); empty = numbers are only cleaned.
    pub country_code: String,
    /// The national (trunk) prefix before area codes (`8` in Russia, `0` in Germany, `1` in the US).
    pub national_prefix: String,
    /// Digits of a national number without the prefix (10 in Russia and the US); 0 = variable.
    #[validate(range(max = 15, message = "must be at most 15"))]
    pub national_length: usize,
    /// Prefixes that dial abroad (`00`, `810`, `011`): replaced by `+`.
    pub international_prefixes: Vec<String>,
    /// Trunk/access prefixes the PBX puts before external numbers (`9`, `0`): stripped.
    pub prefixes: Vec<String>,
    /// Shortest number (in digits) treated as external; shorter ones are internal.
    #[validate(range(min = 3, max = 20, message = "must be between 3 and 20"))]
    pub min_external_length: usize,
    /// Regular-expression rewrites applied in order before everything else.
    pub rewrite: Vec<RewriteRule>,
    /// Employees' mobile numbers that belong to an extension.
    pub fmc: Vec<FmcNumber>,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        PhoneConfig {
            country_code: String::new(),
            national_prefix: String::new(),
            national_length: 0,
            international_prefixes: vec!["00".into()],
            prefixes: Vec::new(),
            min_external_length: 6,
            rewrite: Vec::new(),
            fmc: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    /// A regular expression on the cleaned number (`+` and digits).
    pub r#match: String,
    /// The replacement; `$1` … refer to the groups.
    pub replace: String,
    /// Only for calls over a trunk matching this pattern (channel `PJSIP/x` or endpoint `x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FmcNumber {
    pub number: String,
    /// The extension the mobile belongs to.
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// FastAGI listen address (`127.0.0.1:4573`); empty = FastAGI off.
    #[validate(custom(function = "optional_socket_addr"))]
    pub agi_listen: String,
    /// Hard deadline of the CRM lookup; past it the fallback is answered.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "route_timeout"))]
    pub timeout: Duration,
    /// The extension answered when there is no decision in time (empty: no extension).
    pub fallback_code: String,
    /// How long a found manager is cached per number.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no manager for this number" is cached.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Most numbers cached at once.
    #[validate(range(min = 1, max = 10000000, message = "must be between 1 and 10000000"))]
    pub cache_max: usize,
    /// `ignoreStatus` of `telephony/manager`: true asks for the responsible manager whatever
    /// his CRM status, and pbxgate applies `skip_statuses` from the statuses it keeps.
    pub ignore_status: bool,
    /// Managers whose stored status is one of these are not routed to; the fallback is.
    #[validate(custom(function = "user_statuses"))]
    pub skip_statuses: Vec<String>,
    /// A FastAGI client must send its environment within this time.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub agi_timeout: Duration,
    /// Fixed answers checked before the CRM.
    pub r#static: Vec<StaticRoute>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            agi_listen: String::new(),
            timeout: Duration::from_millis(800),
            fallback_code: String::new(),
            cache_ttl: Duration::from_secs(600),
            negative_cache_ttl: Duration::from_secs(60),
            cache_max: 100_000,
            ignore_status: true,
            skip_statuses: vec!["dinner".into(), "break".into()],
            agi_timeout: Duration::from_secs(5),
            r#static: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticRoute {
    /// Pattern(s) on the caller's number (any of its forms); empty = any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub phone: Vec<String>,
    /// Pattern(s) on the dialled number; empty = any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub did: Vec<String>,
    pub code: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Ignore,
    Register,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: RuleAction,
    /// A label for logs; the rule's index is used otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `in`, `out`, `internal` (one or a list).
    #[serde(default, deserialize_with = "one_or_many")]
    pub direction: Vec<String>,
    /// Extension code patterns: any extension of the call matching one.
    #[serde(default, deserialize_with = "one_or_many")]
    pub extension: Vec<String>,
    /// Trunk patterns on the channel (`PJSIP/trunk`) or endpoint (`trunk`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub trunk: Vec<String>,
    /// Patterns on the dialled number (any of its forms).
    #[serde(default, deserialize_with = "one_or_many")]
    pub did: Vec<String>,
    /// Patterns on the customer's number (any of its forms).
    #[serde(default, deserialize_with = "one_or_many")]
    pub phone: Vec<String>,
}

impl RuleConfig {
    /// A rule with this action and no condition yet (it matches every call).
    pub fn new(action: RuleAction) -> RuleConfig {
        RuleConfig {
            action,
            name: None,
            direction: Vec::new(),
            extension: Vec::new(),
            trunk: Vec::new(),
            did: Vec::new(),
            phone: Vec::new(),
        }
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct ClickToCallConfig {
    /// The same (extension, number) again within this window is answered but not dialled twice.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// Originates allowed per extension per minute (0 = no limit).
    pub per_extension_per_minute: u32,
    /// Originates allowed in total per minute (0 = no limit).
    pub global_per_minute: u32,
}

impl Default for ClickToCallConfig {
    fn default() -> Self {
        ClickToCallConfig {
            dedupe_window: Duration::from_secs(5),
            per_extension_per_minute: 10,
            global_per_minute: 120,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerStatusConfig {
    /// Statuses that pause the manager in the queues (`QueuePause Paused=true Reason=<status>`);
    /// any other status unpauses.
    #[validate(custom(function = "user_statuses"))]
    pub pause_statuses: Vec<String>,
    /// The queue member interface of a manager; `{code}` is the extension.
    #[validate(custom(function = "channel_template"))]
    pub queue_interface: String,
    /// Queues to act on; empty = all queues.
    pub queues: Vec<String>,
}

impl Default for ManagerStatusConfig {
    fn default() -> Self {
        ManagerStatusConfig {
            pause_statuses: vec!["dinner".into(), "break".into()],
            queue_interface: "PJSIP/{code}".into(),
            queues: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[validate(custom(function = "non_empty_path"))]
    pub path: PathBuf,
    /// A store write + flush that takes longer than this means the store is stuck: the process
    /// exits so that its supervisor restarts it (0 = never).
    #[serde(with = "humantime_serde")]
    pub stall_limit: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("data/pbxgate.sled"),
            stall_limit: Duration::from_secs(120),
        }
    }
}

/// Asterisk's CDR CSV, read at startup for the calls that ended while pbxgate was not running.
#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// `cdr-csv/Master.csv` (cdr_csv's 18 columns, `loguniqueid=yes`); empty = no recovery.
    pub cdr_csv: PathBuf,
    /// The time zone of the CDR times (`usegmtime=no` writes the PBX's local time).
    #[validate(custom(function = "timezone"))]
    pub timezone: String,
    /// How far back a restart looks at most (a service stopped for a week recovers a week).
    #[serde(with = "humantime_serde")]
    pub max_gap: Duration,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            cdr_csv: PathBuf::new(),
            timezone: "UTC".into(),
            max_gap: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `pbxgate=debug,actix_web=warn`, ...
    #[validate(custom(function = "log_filter"))]
    pub level: String,
    /// `text` or `json`.
    #[validate(custom(function = "log_format"))]
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserCode {
    #[validate(range(min = 1, message = "must be a positive CRM user id"))]
    pub user_id: u64,
    #[validate(custom(function = "extension_code"))]
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalPhone {
    #[validate(length(min = 1, max = 255, message = "must not be empty"))]
    pub site: String,
    #[validate(custom(function = "phone_number"))]
    pub number: String,
}

impl HttpConfig {
    /// `public_url` without a trailing slash, ready to have absolute paths appended.
    pub fn public_base(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }
}

/// Every problem found while loading, one per line, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config error: {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

/// Where the configuration came from, for the startup log line.
#[derive(Debug, Clone)]
pub enum Origin {
    File(PathBuf),
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Defaults => f.write_str("built-in defaults"),
        }
    }
}

impl Config {
    /// Loads from `path` (or `./config.toml` if it exists, else the defaults) and the process
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<(Config, Origin), ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Same as [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Origin), ConfigError> {
        let (text, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::one(format!("--config {}: cannot read: {e}", p.display()))
                })?;
                (text, Origin::File(p.to_path_buf()))
            }
            None => match std::fs::read_to_string(DEFAULT_PATH) {
                Ok(text) => (text, Origin::File(PathBuf::from(DEFAULT_PATH))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (String::new(), Origin::Defaults)
                }
                Err(e) => {
                    return Err(ConfigError::one(format!(
                        "{DEFAULT_PATH}: cannot read: {e}"
                    )))
                }
            },
        };
        let config = Self::from_toml_and_env(&text, env).map_err(|mut e| {
            if let Origin::File(p) = &origin {
                for line in &mut e.problems {
                    if line.starts_with("TOML syntax") {
                        *line = format!("{}: {line}", p.display());
                    }
                }
            }
            e
        })?;
        Ok((config, origin))
    }

    /// Parses TOML text, applies `PBXGATE__*` overrides from `env`, fills defaults, validates.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::one(format!("TOML syntax: {}", e.message()))
        })?;
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::one(format!("internal: defaults do not serialise: {e}")))?;

        let mut problems = Vec::new();
        let overrides: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        for (var, raw) in overrides {
            if let Err(p) = apply_env(&mut tree, &defaults, &var, &raw) {
                problems.push(p);
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }

        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().message().to_string();
                ConfigError::one(if path == "." {
                    inner
                } else {
                    format!("{path}: {inner}")
                })
            })?;
        config.check()?;
        Ok(config)
    }

    /// Runs every validation rule and reports all violations.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(errors) = self.validate() {
            flatten_errors("", &errors, &mut problems);
        }
        self.check_mappings(&mut problems);
        problems.sort();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    fn check_mappings(&self, problems: &mut Vec<String>) {
        let mut codes = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for (i, u) in self.users.iter().enumerate() {
            if let Some(first) = codes.insert(u.code.as_str(), i) {
                problems.push(format!(
                    "users[{i}].code: extension {} is already given to users[{first}]",
                    u.code
                ));
            }
            if let Some(first) = ids.insert(u.user_id, i) {
                problems.push(format!(
                    "users[{i}].user_id: user {} is already mapped in users[{first}]",
                    u.user_id
                ));
            }
        }
        let mut numbers = BTreeMap::new();
        for (i, p) in self.external_phones.iter().enumerate() {
            if let Some(first) = numbers.insert(p.number.as_str(), i) {
                problems.push(format!(
                    "external_phones[{i}].number: {} is already listed in external_phones[{first}]",
                    p.number
                ));
            }
        }
        if self.ami.reconnect_min > self.ami.reconnect_max {
            problems.push("ami.reconnect_min: must not be larger than ami.reconnect_max".into());
        }
        if self.ami.ping_timeout > self.ami.ping_interval {
            problems.push("ami.ping_timeout: must not be larger than ami.ping_interval".into());
        }
        for (i, q) in self.manager_status.queues.iter().enumerate() {
            if q.is_empty() || q.len() > 128 || q.chars().any(|c| c.is_control()) {
                problems.push(format!(
                    "manager_status.queues[{i}]: must be 1 to 128 printable characters"
                ));
            }
        }
        if self.history.retry_base > self.history.retry_max {
            problems.push("history.retry_base: must not be larger than history.retry_max".into());
        }
        if self.crm.retry_base > self.crm.retry_max {
            problems.push("crm.retry_base: must not be larger than crm.retry_max".into());
        }
        crate::phone::check_config(&self.phone, problems);
        crate::pipeline::rules::check_config(&self.rules, problems);
        crate::routing::check_config(&self.routing, problems);
        let command = &self.records.convert_command;
        if !self.records.convert.is_empty() || !command.is_empty() {
            if command
                .first()
                .is_none_or(|program| program.trim().is_empty())
            {
                problems
                    .push("records.convert_command: must name the encoder program first".into());
            } else if !command.iter().any(|a| a.contains("{input}"))
                || !command.iter().any(|a| a.contains("{output}"))
            {
                problems.push(
                    "records.convert_command: must contain {input} and {output} (e.g. [\"lame\", \"--quiet\", \"{input}\", \"{output}\"])"
                        .into(),
                );
            }
        }
    }
}

/// Applies one `PBXGATE__A__B=value` to the tree. The type of the value is taken from the
/// built-in default at that key, so `PBXGATE__CRM__API_KEY=12345` stays a string.
fn apply_env(
    tree: &mut toml::Table,
    defaults: &toml::Table,
    var: &str,
    raw: &str,
) -> Result<(), String> {
    let segments: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let key = segments.join(".");
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "{var}: malformed name (expected PBXGATE__<SECTION>__<KEY>)"
        ));
    }
    let mut default: Option<&toml::Value> = None;
    let mut table = defaults;
    for (i, seg) in segments.iter().enumerate() {
        match table.get(seg) {
            Some(toml::Value::Table(t)) if i + 1 < segments.len() => table = t,
            Some(v) if i + 1 == segments.len() => default = Some(v),
            _ => break,
        }
    }
    let Some(default) = default else {
        return Err(format!(
            "{key}: unknown key (from environment variable {var})"
        ));
    };
    let value = coerce(default, raw)
        .map_err(|why| format!("{key}: {why} (from environment variable {var})"))?;

    let mut node = tree;
    for seg in &segments[..segments.len() - 1] {
        let entry = node
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "{key}: {seg} is not a section (from environment variable {var})"
                ))
            }
        };
    }
    node.insert(segments[segments.len() - 1].clone(), value);
    Ok(())
}

fn coerce(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    let trimmed = raw.trim();
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => trimmed
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        toml::Value::Float(_) => trimmed
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("expected a number, got {raw:?}")),
        toml::Value::Boolean(_) => match trimmed.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {raw:?}")),
        },
        // Arrays and tables: a TOML inline value, e.g. `[{user_id = 1, code = "101"}]`.
        _ => {
            let doc: toml::Table = format!("v = {trimmed}")
                .parse()
                .map_err(|_| "expected a TOML inline array or table".to_string())?;
            doc.get("v")
                .cloned()
                .ok_or_else(|| "expected a value".to_string())
        }
    }
}

fn flatten_errors(prefix: &str, errors: &ValidationErrors, out: &mut Vec<String>) {
    for (field, kind) in errors.errors() {
        let key = if field == "__all__" {
            prefix.to_string()
        } else if prefix.is_empty() {
            field.to_string()
        } else {
            format!("{prefix}.{field}")
        };
        match kind {
            ValidationErrorsKind::Field(list) => {
                for e in list {
                    let msg = e.message.as_deref().unwrap_or(&e.code);
                    out.push(format!("{key}: {msg}"));
                }
            }
            ValidationErrorsKind::Struct(inner) => flatten_errors(&key, inner, out),
            ValidationErrorsKind::List(items) => {
                for (i, inner) in items {
                    flatten_errors(&format!("{key}[{i}]"), inner, out);
                }
            }
        }
    }
}

fn problem(msg: impl Into<String>) -> ValidationError {
    let msg: String = msg.into();
    ValidationError::new("invalid").with_message(msg.into())
}

fn non_empty_path(value: &Path) -> Result<(), ValidationError> {
    if value.as_os_str().is_empty() {
        Err(problem("must not be empty"))
    } else {
        Ok(())
    }
}

fn socket_addr(value: &str) -> Result<(), ValidationError> {
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| problem(format!("{value:?} is not an address like 127.0.0.1:8088")))
}

fn optional_socket_addr(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        Ok(())
    } else {
        socket_addr(value)
    }
}

fn route_timeout(value: &Duration) -> Result<(), ValidationError> {
    if *value < Duration::from_millis(10) || *value > Duration::from_secs(30) {
        return Err(problem("must be between 10ms and 30s"));
    }
    Ok(())
}

fn http_url(value: &str) -> Result<(), ValidationError> {
    let url = url::Url::parse(value)
        .map_err(|e| problem(format!("{value:?} is not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(problem(format!(
            "{value:?} must start with http:// or https://"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(problem(format!("{value:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem(format!(
            "{value:?} must not have a query or a fragment"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(problem("must not contain credentials"));
    }
    Ok(())
}

fn module_code(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 1 to 64 of a-z, A-Z, 0-9, '-', '_'"
        )))
    }
}

fn client_id(value: &Secret) -> Result<(), ValidationError> {
    let v = value.expose();
    if v.is_empty() {
        return Ok(());
    }
    if v.len() < 16 || v.len() > 128 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(problem(
            "must be empty (generated) or 16 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

fn request_timeout(value: &Duration) -> Result<(), ValidationError> {
    if value.is_zero() || *value > Duration::from_secs(300) {
        return Err(problem("must be more than 0 and at most 5m"));
    }
    Ok(())
}

fn client_timeout(value: &Duration) -> Result<(), ValidationError> {
    if *value < Duration::from_millis(100) || *value > Duration::from_secs(60) {
        return Err(problem("must be between 100ms and 1m"));
    }
    Ok(())
}

fn backoff(value: &Duration) -> Result<(), ValidationError> {
    if value.is_zero() || *value > Duration::from_secs(3600) {
        return Err(problem("must be more than 0 and at most 1h"));
    }
    Ok(())
}

fn token(value: &Secret) -> Result<(), ValidationError> {
    let v = value.expose();
    if v.is_empty() || (16..=256).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(problem(
            "must be empty (off) or 16 to 256 printable ASCII characters",
        ))
    }
}

fn link_ttl(value: &Duration) -> Result<(), ValidationError> {
    if *value > Duration::from_secs(36500 * 24 * 3600) {
        return Err(problem("must be at most 36500d (0 = forever)"));
    }
    Ok(())
}

fn convert_format(value: &str) -> Result<(), ValidationError> {
    match value {
        "" | "mp3" => Ok(()),
        _ => Err(problem(format!(
            "{value:?} must be \"\" (no conversion) or \"mp3\""
        ))),
    }
}

fn timezone(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || jiff::tz::TimeZone::get(value).is_ok() {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} is not a known time zone (e.g. Europe/Moscow)"
        )))
    }
}

fn regex_pattern(value: &str) -> Result<(), ValidationError> {
    regex::Regex::new(value)
        .map(|_| ())
        .map_err(|e| problem(format!("{value:?} is not a regular expression ({e})")))
}

fn ami_events(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b',' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be on, off, or a comma-separated class list"
        )))
    }
}

fn dialplan_name(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 80
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 1 to 80 of a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

fn channel_template(value: &str) -> Result<(), ValidationError> {
    if !value.contains("{code}") {
        return Err(problem(format!("{value:?} must contain {{code}}")));
    }
    if !value.contains('/')
        || value.chars().any(|c| c.is_control() || c == ',')
        || value.len() > 200
    {
        return Err(problem(format!(
            "{value:?} must look like TECH/{{code}} (e.g. PJSIP/{{code}})"
        )));
    }
    Ok(())
}

fn user_statuses(value: &[String]) -> Result<(), ValidationError> {
    match value
        .iter()
        .find(|s| !matches!(s.as_str(), "free" | "busy" | "dinner" | "break"))
    {
        Some(bad) => Err(problem(format!(
            "{bad:?} is not one of free, busy, dinner, break"
        ))),
        None => Ok(()),
    }
}

fn log_filter(value: &str) -> Result<(), ValidationError> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| ())
        .map_err(|e| problem(format!("{value:?} is not a log filter ({e})")))
}

fn log_format(value: &str) -> Result<(), ValidationError> {
    match value {
        "text" | "json" => Ok(()),
        _ => Err(problem(format!("{value:?} must be \"text\" or \"json\""))),
    }
}

/// An extension code as retailCRM stores it: 1 to 16 of digits, `*`, `#`.
pub fn is_extension_code(value: &str) -> bool {
    (1..=16).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#')
}

fn extension_code(value: &str) -> Result<(), ValidationError> {
    if is_extension_code(value) {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 1 to 16 of 0-9, '*', '#'"
        )))
    }
}

fn unassigned_code(value: &str) -> Result<(), ValidationError> {
    let v = value.trim();
    let ok = v.is_empty()
        || is_extension_code(v)
        || v.strip_prefix("user:")
            .and_then(|id| id.parse::<i64>().ok())
            .is_some_and(|id| id > 0);
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be an extension code (1 to 16 of 0-9, '*', '#') or user:<CRM user id>"
        )))
    }
}

fn outbound_line(value: &OutboundLine) -> Result<(), ValidationError> {
    let check = |n: &str| n.is_empty() || phone_number(n).is_ok();
    match value {
        OutboundLine::One(n) if !check(n) => Err(problem(format!(
            "{n:?} must be 3 to 20 digits with an optional leading '+'"
        ))),
        OutboundLine::PerTrunk(map) => match map.iter().find(|(_, n)| !check(n)) {
            Some((trunk, n)) => Err(problem(format!(
                "{trunk}: {n:?} must be 3 to 20 digits with an optional leading '+'"
            ))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

fn phone_number(value: &str) -> Result<(), ValidationError> {
    let digits = value.strip_prefix('+').unwrap_or(value);
    if (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 3 to 20 digits with an optional leading '+'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_text_gives_the_defaults() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:8088");
        assert_eq!(c.crm.module_code, "pbxgate");
        assert_eq!(c.crm.telephony_rps, 40);
        assert!(c.users.is_empty());
    }

    #[test]
    fn the_shipped_config_file_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
        let c = Config::from_toml_and_env(&text, env(&[])).unwrap();
        assert_eq!(c.storage.path, PathBuf::from("data/pbxgate.sled"));
    }

    #[test]
    fn the_commented_examples_in_the_shipped_config_are_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
        let example = regex::Regex::new(r"^# (\[\[|[a-z_]+ = )").unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| {
                if example.is_match(l) {
                    format!("{}\n", &l[2..])
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let c = Config::from_toml_and_env(&uncommented, env(&[])).unwrap();
        assert_eq!(c.phone.rewrite.len(), 2);
        assert_eq!(c.phone.fmc.len(), 1);
        assert_eq!(c.routing.r#static.len(), 2);
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.users.len(), 1);
    }

    #[test]
    fn env_overrides_the_file_and_keeps_strings_strings() {
        let text = "[crm]\napi_key = \"from-file\"\nrps = 5\n";
        let c = Config::from_toml_and_env(
            text,
            env(&[
                ("PBXGATE__CRM__API_KEY", "12345"),
                ("PBXGATE__CRM__RPS", "7"),
                ("PBXGATE__CRM__REGISTER_ON_START", "false"),
                ("PBXGATE__USERS", "[{user_id = 3, code = \"103\"}]"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.crm.api_key.expose(), "12345");
        assert_eq!(c.crm.rps, 7);
        assert!(!c.crm.register_on_start);
        assert_eq!(
            c.users,
            vec![UserCode {
                user_id: 3,
                code: "103".into()
            }]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml_and_env("[crm]\napi_kye = \"x\"\n", env(&[])).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert!(
            e.problems[0].contains("crm") && e.problems[0].contains("api_kye"),
            "{e}"
        );

        let e = Config::from_toml_and_env("", env(&[("PBXGATE__CRM__NOPE", "1")])).unwrap_err();
        assert!(e.problems[0].starts_with("crm.nope: unknown key"), "{e}");

        let e = Config::from_toml_and_env("[nosuch]\nx = 1\n", env(&[])).unwrap_err();
        assert!(e.problems[0].contains("nosuch"), "{e}");
    }

    #[test]
    fn every_invalid_value_is_reported_with_its_key() {
        let text = r#"
            [http]
            listen = "nowhere"
            public_url = "ftp://x"
            [crm]
            url = "not a url"
            rps = 0
            module_code = "bad code"
            [log]
            format = "xml"
            [[users]]
            user_id = 0
            code = "10a"
            [[users]]
            user_id = 2
            code = "102"
            [[users]]
            user_id = 2
            code = "102"
            [[external_phones]]
            site = "shop"
            number = "12"
        "#;
        let e = Config::from_toml_and_env(text, env(&[])).unwrap_err();
        let all = e.to_string();
        for key in [
            "http.listen:",
            "http.public_url:",
            "crm.url:",
            "crm.rps:",
            "crm.module_code:",
            "log.format:",
            "users[0].user_id:",
            "users[0].code:",
            "users[2].code:",
            "users[2].user_id:",
            "external_phones[0].number:",
        ] {
            assert!(all.contains(key), "missing {key} in:\n{all}");
        }
        assert_eq!(all.lines().count(), e.problems.len());
    }

    #[test]
    fn bad_env_values_name_the_key_and_the_variable() {
        let e = Config::from_toml_and_env("", env(&[("PBXGATE__AMI__PORT", "http")])).unwrap_err();
        assert!(
            e.problems[0].starts_with("ami.port: expected an integer"),
            "{e}"
        );
        assert!(e.problems[0].contains("PBXGATE__AMI__PORT"), "{e}");
    }

    #[test]
    fn wrong_types_in_the_file_name_the_key() {
        let e = Config::from_toml_and_env("[ami]\nport = \"x\"\n", env(&[])).unwrap_err();
        assert!(e.problems[0].starts_with("ami.port:"), "{e}");
        let e = Config::from_toml_and_env("[crm]\ntimeout = \"soon\"\n", env(&[])).unwrap_err();
        assert!(e.problems[0].starts_with("crm.timeout:"), "{e}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Config::from_toml_and_env(
            "",
            env(&[
                ("PBXGATE__CRM__API_KEY", "supersecretkey"),
                ("PBXGATE__AMI__SECRET", "amisecret"),
            ]),
        )
        .unwrap();
        let dump = format!("{c:?}");
        assert!(
            !dump.contains("supersecretkey") && !dump.contains("amisecret"),
            "{dump}"
        );
    }

    #[test]
    fn records_defaults_and_validation() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(c.records.dir, PathBuf::from("/var/spool/asterisk/monitor"));
        assert_eq!(c.records.link_ttl, Duration::from_secs(365 * 86400));
        assert_eq!(c.records.convert_timeout, Duration::from_secs(10));
        assert!(c.records.convert.is_empty() && c.records.secret.is_empty());

        let c = Config::from_toml_and_env(
            "[records]\nlink_ttl = \"0s\"\nkeep_days = 90\nconvert = \"mp3\"\n",
            env(&[("PBXGATE__RECORDS__LINK_TTL", "30d")]),
        )
        .unwrap();
        assert_eq!(c.records.link_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(c.records.keep_days, 90);

        let text = r#"
            [records]
            dir = ""
            secret = "short"
            convert = "ogg"
            convert_command = ["lame", "{input}"]
            keep_days = 100000
        "#;
        let all = Config::from_toml_and_env(text, env(&[]))
            .unwrap_err()
            .to_string();
        for key in [
            "records.dir:",
            "records.secret:",
            "records.convert:",
            "records.convert_command:",
            "records.keep_days:",
        ] {
            assert!(all.contains(key), "missing {key} in:\n{all}");
        }
    }
}
