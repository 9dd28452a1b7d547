//! `pbxgate check`: a configuration doctor. Each check prints one line, ✓ or ✗ with a reason.
//!
//! Also the configuration as the service accepts it: [`problems`] runs the config's own rules
//! and those of the modules that give the phone, rules and routing sections their meaning, so
//! that `config` depends on nothing above it. `Config::load`, `Config::load_from` and
//! `Config::from_toml_and_env` (read, then [`problems`]) are defined here for that reason.

use std::io::Write;
use std::path::Path;

use crate::config::{Config, ConfigError, Origin};
use crate::store::Store;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    /// Works, but something will not reach the CRM (`!`): does not fail the check.
    pub warning: bool,
    pub text: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match (self.ok, self.warning) {
            (false, _) => "✗",
            (true, true) => "!",
            (true, false) => "✓",
        };
        write!(f, "{mark} {}", self.text)
    }
}

fn line(ok: bool, text: impl Into<String>) -> CheckLine {
    CheckLine {
        ok,
        warning: false,
        text: text.into(),
    }
}

/// Every problem of `config`, sorted, one line each naming its key: the config's own rules and
/// the phone, rules and routing sections' checks.
pub fn problems(config: &Config) -> Result<(), ConfigError> {
    let mut found = match config.check() {
        Ok(()) => Vec::new(),
        Err(e) => e.problems,
    };
    crate::phone::check_config(&config.phone, &mut found);
    crate::pipeline::rules::check_config(&config.rules, &mut found);
    crate::routing::check_config(&config.routing, &mut found);
    found.sort();
    if found.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems: found })
    }
}

impl Config {
    /// Loads from `path` (or `./config.toml` if it exists, else the defaults) and the process
    /// environment, and checks it.
    pub fn load(path: Option<&Path>) -> Result<(Config, Origin), ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Same as [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Origin), ConfigError> {
        let (config, origin) = Self::read_unchecked(path, env)?;
        problems(&config)?;
        Ok((config, origin))
    }

    /// Parses TOML text, applies `PBXGATE__*` overrides from `env`, fills defaults, validates.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = Self::parse_unchecked(text, env)?;
        problems(&config)?;
        Ok(config)
    }
}

/// Configuration that works but keeps some calls from the CRM; also logged at startup.
pub fn config_warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.calls.unassigned().is_none() {
        w.push(
            "calls.unassigned_code is empty: calls no extension touched (hung up in the IVR or \
             a queue before any phone rang) are kept locally, held, and cannot reach the CRM"
                .to_string(),
        );
    }
    w
}

/// Runs every check (config validity was checked by loading it), printing each line as it is
/// known. Returns whether all passed.
pub async fn run(config: &Config, origin: &Origin, out: &mut dyn Write) -> bool {
    let mut all_ok = true;
    let mut emit = |l: CheckLine| {
        all_ok &= l.ok;
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
    };

    emit(line(true, format!("config valid ({origin})")));
    for w in config_warnings(config) {
        emit(CheckLine {
            ok: true,
            warning: true,
            text: w,
        });
    }
    emit(check_store(config).await);
    emit(check_crm(config).await);
    emit(check_ami(config).await);
    all_ok
}

async fn check_store(config: &Config) -> CheckLine {
    let path = config.storage.path.display().to_string();
    match Store::open(&config.storage.path) {
        Ok(store) => match store.check_writable().await {
            Ok(()) => line(true, format!("store writable ({path})")),
            Err(e) => line(false, format!("store not writable: {e}")),
        },
        Err(e) => line(false, format!("store cannot be opened: {e}")),
    }
}

async fn check_crm(config: &Config) -> CheckLine {
    // The check needs no clientId: it registers nothing.
    let crm = match crate::crm::connect(
        std::sync::Arc::new(config.clone()),
        crate::base::secret::Secret::new(""),
        None,
        crate::hooks::Hooks::none(),
    ) {
        Ok(c) => c,
        Err(e) => return line(false, format!("CRM client: {e}")),
    };
    match crm.check().await {
        Ok(text) => line(true, text),
        Err(text) => line(false, text),
    }
}

async fn check_ami(config: &Config) -> CheckLine {
    let addr = format!("{}:{}", config.ami.host, config.ami.port);
    match crate::pbx::ami::AmiClient::probe(&config.ami).await {
        Ok(banner) => line(
            true,
            format!(
                "AMI {addr} reachable ({banner}), login accepted for {}",
                config.ami.username
            ),
        ),
        Err(e) => line(false, format!("AMI {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::ident::ExtensionCode;
    use crate::config::{RuleAction, RuleConfig, StaticRoute};

    #[test]
    fn problems_of_every_section_come_in_one_sorted_list() {
        let text = r#"
            [crm]
            rps = 0
            [phone]
            country_code = "x"
            [routing]
            fallback_code = "1a"
            [[rules]]
            action = "ignore"
            did = "("
        "#;
        let e = Config::from_toml_and_env(text, Vec::new()).unwrap_err();
        let keys: Vec<&str> = e
            .problems
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "crm.rps",
                "phone.country_code",
                "routing.fallback_code",
                "rules[0].did[0]"
            ],
            "{e}"
        );
        assert!(e.problems[2].ends_with(ExtensionCode::RULE), "{e}");

        let mut config = Config::default();
        assert_eq!(problems(&config), Ok(()));
        config.rules = vec![RuleConfig {
            direction: vec!["sideways".into()],
            ..RuleConfig::new(RuleAction::Ignore)
        }];
        config.routing.r#static = vec![StaticRoute {
            phone: Vec::new(),
            did: Vec::new(),
            code: "101".into(),
        }];
        assert!(
            config.check().is_ok(),
            "the sections' own modules check these"
        );
        let e = problems(&config).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.problems[0].starts_with("routing.static[0]:"), "{e}");
        assert!(e.problems[1].starts_with("rules[0].direction[0]"), "{e}");
    }
}
