//! The CRM port: everything pbxgate asks of a CRM, in pbxgate's own terms.
//!
//! The pipeline, the router, the outbox and startup hold an `Arc<dyn Crm>` and know nothing of
//! any CRM's wire format. An adapter (one module per CRM under `crm/`) maps neutral call
//! records and live events to its API and decides what its answers mean:
//! - **delivery** is per call: [`Delivery`] says whether a finished call was taken, must wait
//!   (the CRM is down, or needs an operator), or was refused for good. How many calls one
//!   delivery may carry, how a refused batch is narrowed down to the calls at fault, and what
//!   must be remembered between a call's live events and its delivery are the adapter's
//!   business;
//! - **failures** of other requests are classified once, by the adapter, into a
//!   [`CrmFailure`]: worth retrying, needing an operator, or refused;
//! - the adapter owns the CRM's rate limits and retries of single requests; the schedule of
//!   retrying whole deliveries is the outbox's.

use futures_util::future::BoxFuture;

use crate::calls::{CallRecord, LiveEvent};

/// What a live event came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The CRM has it.
    Sent,
    /// Not for this CRM (an internal call it must not see): nothing was sent.
    Skipped,
}

/// A finished call ready for delivery, with the link the CRM plays its recording from.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    pub record: &'a CallRecord,
    pub record_url: Option<&'a str>,
}

/// What became of one finished call given to [`Crm::deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The CRM took it.
    Delivered,
    /// The CRM had it already (an earlier attempt got through).
    Duplicate,
    /// Not sent: the CRM would refuse it as it stands (held until the configuration changes).
    Held(String),
    /// The CRM refused it for good, with its reason.
    Rejected(String),
    /// A transient failure (outage, rate limit, timeout): try again later.
    RetryLater(String),
    /// Sending cannot work until an operator fixes something (key, account, settings).
    Blocked(String),
}

/// Why a CRM request failed, as the caller needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// No credentials are configured: nothing was tried.
    NotConfigured,
    /// Worth retrying: an outage, a rate limit, a timeout.
    Transient,
    /// Needs an operator: a wrong key, a missing account, a disabled feature.
    Blocked,
    /// The request itself was refused; retrying it unchanged cannot help.
    Refused,
}

/// A failed CRM request: its class and a loggable message (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CrmFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl CrmFailure {
    pub fn is_retriable(&self) -> bool {
        self.kind == FailureKind::Transient
    }
}

/// The manager responsible for a customer, as the CRM knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Responsible {
    /// The manager's extension, when the CRM has one.
    pub code: Option<String>,
    pub user_id: Option<i64>,
}

/// One CRM user and their extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub user_id: i64,
    pub code: String,
}

/// A manager's availability as the CRM reports it (kept in the store).
pub use crate::store::UserStatus;

/// The CRM, as the rest of pbxgate sees it. Cheap to share (`Arc<dyn Crm>`).
pub trait Crm: Send + Sync + 'static {
    /// The CRM's name for log lines and `/ready` (`retailCRM`).
    fn name(&self) -> &'static str;

    /// Where the CRM is (for `/ready`; never carries a secret).
    fn url(&self) -> &str;

    /// False without credentials: nothing is sent, and startup says why.
    fn is_configured(&self) -> bool;

    /// What is missing when [`Crm::is_configured`] is false (names the config keys).
    fn unconfigured(&self) -> &'static str {
        "crm.api_key is empty"
    }

    /// Changes whenever a request succeeds: after an outage, the first request to get through
    /// tells the others that the CRM is back, so that backlogs do not wait out their backoff.
    fn successes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Publishes a live event (a pop-up while phones ring, a hangup).
    fn publish<'a>(&'a self, event: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>>;

    /// Most calls one [`Crm::deliver`] may carry.
    fn batch_limit(&self) -> usize;

    /// Delivers finished calls; one [`Delivery`] per call, in order.
    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>>;

    /// The settings that shape what a delivered call looks like to this CRM (numbers included):
    /// when they change, calls held or refused before are tried again.
    fn shape(&self) -> String;

    /// The time zone of the CRM account (call times in it; also how recordings are dated).
    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone>;

    /// The manager responsible for a customer's number, if the CRM names one.
    fn responsible<'a>(
        &'a self,
        phone: &'a str,
        ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>>;

    /// Which CRM user has which extension.
    fn directory(&self) -> Vec<DirectoryEntry>;

    /// Registers (or updates) pbxgate in the CRM, once.
    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>>;

    /// For `pbxgate check`: can we reach the CRM, and may our credentials do what we need?
    /// `Ok` and `Err` both carry the line to print.
    fn check(&self) -> BoxFuture<'_, Result<String, String>>;

    /// The adapter's own background work, called by the history scheduler after each drain
    /// (retries of follow-up tasks). Nothing by default.
    fn maintain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The API requests' timings, and whether the CRM refuses the key (for `/metrics` and
    /// `/ready`); `None` for an adapter that does not keep them.
    fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        None
    }

    /// How long the CRM's next request would wait for its rate limit (zero: none). The outbox
    /// waits that long (bounded) before reading a batch that is not full: the delivery would
    /// wait anyway, and the calls ending meanwhile go in the same request.
    fn pacing(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// The CRM's own id of a call in progress (Bitrix24's `CALL_ID`), waiting at most `within`
    /// for the call to be registered; `None` when this CRM has no such id, or not in time.
    fn call_ref<'a>(
        &'a self,
        _external_id: &'a str,
        _within: std::time::Duration,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    /// The CRM registered this call itself under `crm_ref` (a click-to-call it asked for, by
    /// its user `user_id`): the call is finished under that id rather than registered again.
    /// Must be durable before it returns. Nothing by default.
    fn adopt<'a>(
        &'a self,
        _external_id: &'a str,
        _crm_ref: &'a str,
        _user_id: i64,
    ) -> BoxFuture<'a, Result<(), CrmFailure>> {
        Box::pin(async { Ok(()) })
    }

    /// A method of the CRM's own API passed through as it is (CallGate's `bitrix_api`): the
    /// CRM's status and body, unchanged. Refused by CRMs that do not offer it.
    fn passthrough<'a>(
        &'a self,
        method: &'a str,
        _params: serde_json::Value,
    ) -> BoxFuture<'a, Result<(u16, Vec<u8>), CrmFailure>> {
        let name = self.name();
        Box::pin(async move {
            Err(CrmFailure {
                kind: FailureKind::Refused,
                message: format!("{name} has no API pass-through (method {method})"),
            })
        })
    }
}
