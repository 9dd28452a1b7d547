//! What became of the calls the outbox handed to the CRM, counted per outcome (for `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::crm::Delivery;

/// One count per call and outcome.
#[derive(Debug, Default)]
pub struct UploadCounts {
    delivered: AtomicU64,
    duplicate: AtomicU64,
    held: AtomicU64,
    rejected: AtomicU64,
    retry: AtomicU64,
    blocked: AtomicU64,
    not_registered: AtomicU64,
}

impl UploadCounts {
    pub fn count(&self, outcome: &Delivery) {
        let n = match outcome {
            Delivery::Delivered => &self.delivered,
            Delivery::Duplicate => &self.duplicate,
            Delivery::Held(_) => &self.held,
            Delivery::Rejected(_) => &self.rejected,
            Delivery::RetryLater(_) => &self.retry,
            Delivery::Blocked(_) => &self.blocked,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// A call `need_registration` kept from the CRM when its history was due.
    pub fn not_registered(&self) {
        self.not_registered.fetch_add(1, Ordering::Relaxed);
    }

    /// Each outcome's name (as `/metrics` labels it) and count.
    pub fn all(&self) -> [(&'static str, u64); 7] {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        [
            ("delivered", get(&self.delivered)),
            ("duplicate", get(&self.duplicate)),
            ("held", get(&self.held)),
            ("rejected", get(&self.rejected)),
            ("retry", get(&self.retry)),
            ("blocked", get(&self.blocked)),
            ("not_registered", get(&self.not_registered)),
        ]
    }
}
