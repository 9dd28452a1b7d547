//! A string that must never be printed: API keys, AMI secrets, the module's `clientId`.
//!
//! `Debug` and `Display` print `***` (or `""` when empty, which helps to spot a missing key);
//! `Serialize` writes `***` as well, so a secret cannot leak through a dump of the config.
//! Comparisons go through [`Secret::matches`], which is constant-time for equal lengths.

use serde::{Deserialize, Serialize, Serializer};
use subtle::ConstantTimeEq;

#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that has to send it (an HTTP header, an AMI login).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison with a value received from outside. An empty secret never matches.
    pub fn matches(&self, candidate: &str) -> bool {
        if self.0.is_empty() {
            return false;
        }
        // `ct_eq` on slices of different lengths returns false without looking at the bytes; the
        // length of a secret is not what we protect.
        bool::from(self.0.as_bytes().ct_eq(candidate.as_bytes()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("***")
        }
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    }

    #[test]
    fn matches_only_the_exact_value() {
        let s = Secret::new("abc123");
        assert!(s.matches("abc123"));
        assert!(!s.matches("abc124"));
        assert!(!s.matches("abc12"));
        assert!(!s.matches(""));
        assert!(!Secret::default().matches(""));
    }
}
