//! Loading: built-in defaults < TOML file < `PBXGATE__<SECTION>__<KEY>` environment variables.
//!
//! Unknown keys are errors, wherever they come from; a value of the wrong type names its key
//! (and the variable it came from). What is read here is not yet checked: `Config::load` and
//! `Config::from_toml_and_env` (in `check`) check it, this section's rules and those of
//! the modules that give the phone, rules and routing sections their meaning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::Config;

/// Prefix of environment variables that override the file: `PBXGATE__CRM__API_KEY`.
pub const ENV_PREFIX: &str = "PBXGATE__";
/// The file read when `--config` is not given; a missing default file means "built-in defaults".
pub const DEFAULT_PATH: &str = "config.toml";

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
    /// Reads `path` (or `./config.toml` if it exists, else nothing: the defaults) and applies
    /// `env`, like [`Config::parse_unchecked`]. Used by `Config::load_from`, which also checks.
    pub fn read_unchecked(
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
        let config = Self::parse_unchecked(&text, env).map_err(|mut e| {
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

    /// Parses TOML text, applies `PBXGATE__*` overrides from `env` and fills defaults. Only the
    /// syntax, the keys and the types are checked: the values are checked by
    /// `Config::from_toml_and_env`, which calls this.
    pub fn parse_unchecked(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::one(format!("TOML syntax: {}", e.message()))
        })?;
        let mut defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::one(format!("internal: defaults do not serialise: {e}")))?;
        // `[hooks]` has no default entries: its variables are typed by a template.
        defaults.insert(
            "hooks".into(),
            toml::Value::Table(super::hooks::env_template()),
        );

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
        Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{env, UserCode};

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
        let example = regex::Regex::new(r"^# (\[\[|\[[a-z_.]+\]$|[a-z_]+ = )").unwrap();
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
        assert_eq!(c.hooks.0.len(), 3);
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
    fn bad_env_values_name_the_key_and_the_variable() {
        let e = Config::from_toml_and_env("", env(&[("PBXGATE__AMI__PORT", "http")])).unwrap_err();
        assert!(
            e.problems[0].starts_with("ami.port: expected an integer"),
            "{e}"
        );
        assert!(e.problems[0].contains("PBXGATE__AMI__PORT"), "{e}");
    }

    #[test]
    fn crm_kind_defaults_to_retailcrm_and_unknown_kinds_are_named() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(c.crm.kind, crate::config::CrmKind::RetailCrm);
        let c = Config::from_toml_and_env("[crm]\nkind = \"retailcrm\"\n", env(&[])).unwrap();
        assert_eq!(c.crm.kind, crate::config::CrmKind::RetailCrm);
        let e = Config::from_toml_and_env("[crm]\nkind = \"hubspot\"\n", env(&[])).unwrap_err();
        assert!(e.problems[0].starts_with("crm.kind:"), "{e}");
        let e = Config::from_toml_and_env("", env(&[("PBXGATE__CRM__KIND", "nope")])).unwrap_err();
        assert!(e.problems[0].starts_with("crm.kind:"), "{e}");
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
}
