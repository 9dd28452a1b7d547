//! Configuration: every section the service reads, its defaults and its rules.
//!
//! Loaded from built-in defaults < TOML file < `PBXGATE__<SECTION>__<KEY>` environment
//! variables (see `load.rs`). Unknown keys are errors, wherever they come from. After loading,
//! every value is validated and all problems are reported together, one line each, naming the
//! key (`crm.url: ...`). This module depends on nothing but `crate::base`: the checks that need
//! the phone, rules or routing code are run by `check::problems`, which `Config::load`
//! and `Config::from_toml_and_env` call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use validator::Validate;

use crate::base::ident::ExtensionCode;

mod admin;
mod ami;
mod backfill;
mod bitrix24;
mod callgate;
mod calls;
mod checks;
mod click_to_call;
mod crm;
mod directory;
mod history;
mod hooks;
mod http;
mod kommo;
mod load;
mod log;
mod manager_status;
mod pbx;
mod phone;
mod records;
mod routing;
mod rules;
mod storage;

pub use admin::{AdminConfig, MIN_TOKEN_LEN as ADMIN_MIN_TOKEN_LEN};
pub use ami::{AmiAuth, AmiConfig};
pub use backfill::BackfillConfig;
pub use bitrix24::{webhook_parts, Bitrix24Config, RecordUpload, ShowCard};
pub use callgate::CallgateConfig;
pub use calls::{Assignee, CallsConfig, MissedOwner, OutboundLine};
pub use click_to_call::ClickToCallConfig;
pub use crm::{CrmConfig, CrmKind};
pub use directory::{ExternalPhone, UserCode};
pub use history::HistoryConfig;
pub use hooks::{HookConfig, HooksConfig, HOOK_POINTS};
pub use http::HttpConfig;
pub use kommo::{KommoConfig, UnknownCaller};
pub use load::{ConfigError, Origin, DEFAULT_PATH, ENV_PREFIX};
pub use log::LogConfig;
pub use manager_status::ManagerStatusConfig;
pub use pbx::PbxConfig;
pub use phone::{FmcNumber, PhoneConfig, RewriteRule};
pub use records::RecordsConfig;
pub use routing::{RoutingConfig, StaticRoute};
pub use rules::{RuleAction, RuleConfig};
pub use storage::StorageConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[validate(nested)]
    pub http: HttpConfig,
    #[validate(nested)]
    pub crm: CrmConfig,
    /// `[bitrix24]`: the portal, when `crm.kind = "bitrix24"`.
    #[validate(nested)]
    pub bitrix24: Bitrix24Config,
    /// `[callgate]`: the CallGate-compatible PBX API.
    #[validate(nested)]
    pub callgate: CallgateConfig,
    /// `[kommo]`: the account, when `crm.kind = "kommo"`.
    #[validate(nested)]
    pub kommo: KommoConfig,
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
    /// `[hooks.<point>]`: the integrator's programs called at fixed points of a call's life.
    pub hooks: HooksConfig,
    /// `[admin]`: the dashboard's and admin API's access.
    #[validate(nested)]
    pub admin: AdminConfig,
}

/// `list[i].field: <what> list[first]` for every entry whose key an earlier one has (`first`:
/// the previous entry with it).
fn repeated<K: Ord + std::fmt::Display>(
    problems: &mut Vec<String>,
    list: &str,
    field: &str,
    keys: impl Iterator<Item = K>,
    what: impl Fn(&K) -> String,
) {
    let mut seen = BTreeMap::new();
    for (i, key) in keys.enumerate() {
        let text = what(&key);
        if let Some(first) = seen.insert(key, i) {
            problems.push(format!("{list}[{i}].{field}: {text} {list}[{first}]"));
        }
    }
}

impl Config {
    /// Runs this module's validation rules and reports all violations, sorted. The phone, rules
    /// and routing sections are checked further by their modules: `check::problems`
    /// runs everything.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(errors) = self.validate() {
            checks::flatten_errors("", &errors, &mut problems);
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
        self.hooks.problems(problems);
        let (users, phones) = (&self.users, &self.external_phones);
        let codes = users.iter().map(|u| u.code.as_str());
        repeated(problems, "users", "code", codes, |c| {
            format!("extension {c} is already given to")
        });
        let ids = users.iter().map(|u| u.user_id);
        repeated(problems, "users", "user_id", ids, |u| {
            format!("user {u} is already mapped in")
        });
        let numbers = phones.iter().map(|p| p.number.as_str());
        repeated(problems, "external_phones", "number", numbers, |n| {
            format!("{n} is already listed in")
        });
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

/// An extension code as CRMs store it: see [`ExtensionCode`], whose rule this is.
pub fn is_extension_code(value: &str) -> bool {
    ExtensionCode::is_valid(value)
}

/// `(name, value)` pairs as the process environment gives them, for the tests.
#[cfg(test)]
fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
