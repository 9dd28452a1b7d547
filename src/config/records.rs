//! `[records]`: the recordings served through signed links, and their optional conversion.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{convert_format, link_ttl, non_empty_path, request_timeout, token};
use crate::base::secret::Secret;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{env, Config};

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
