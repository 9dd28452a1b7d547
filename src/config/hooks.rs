//! `[hooks.<point>]`: the integrator's programs (or HTTP services) called at fixed points of a
//! call's life, one table per point, keyed by the point's name.
//!
//! ```toml
//! [hooks.need_registration]
//! command = ["python3", "/etc/pbxgate/hooks/need_registration.py"]   # or: url = "http://..."
//! timeout = "2s"
//! ```
//! Rules (each problem names its key, `hooks.<point>.<field>`): the point is one of
//! [`HOOK_POINTS`]; exactly one of `command` (non-empty, program first) and `url` (http or https,
//! no credentials, query or fragment); `timeout` between 10ms and 60s (default 2s).
//!
//! Environment: `PBXGATE__HOOKS__<POINT>__URL`, `__COMMAND` (a TOML inline array),
//! `__TIMEOUT`, or `PBXGATE__HOOKS__<POINT>` (a TOML inline table) configure a point like the
//! file does. The map has no default entries, so the loader coerces these variables by the
//! template [`env_template`] gives: every known point with an empty [`HookConfig`]. A point
//! that is not known is refused as an unknown key, like any other variable. A variable adds to
//! what the file says for that point: `__URL` over a file's `command` is two ways at once (an
//! error) unless `PBXGATE__HOOKS__<POINT>__COMMAND=[]` clears it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::http_url;

/// Every hook point pbxgate calls, by the name the configuration and the hook's input use.
pub const HOOK_POINTS: &[&str] = &[
    "need_registration",
    "process_client_phone",
    "process_user_phone",
    "process_originate_params",
    "customize_autodistribution",
    "process_record_file_path",
    "process_call_params",
    "process_task_creation_params",
    "post_registration",
    "process_call_event_params",
    "process_upload_params",
    "process_registration_params",
    "customize_show_call_card",
    "process_final_params",
    "customize_attach_record_url",
    "customize_activity",
    "customize_entity",
    "process_contact_creation_params",
    "process_lead_creation_params",
    "process_unsorted_params",
    "process_contact_update_params",
    "process_lead_update_params",
];

/// The shortest and the longest hook timeout accepted.
pub const HOOK_TIMEOUT_MIN: Duration = Duration::from_millis(10);
pub const HOOK_TIMEOUT_MAX: Duration = Duration::from_secs(60);

/// `[hooks.*]`: the configured points, by name. A point not listed costs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HooksConfig(pub BTreeMap<String, HookConfig>);

/// One point's hook: a program run with the input on stdin, or a URL the input is POSTed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookConfig {
    /// The program's argv (no shell). Empty: not a command hook.
    pub command: Vec<String>,
    /// The service's URL. Empty: not an HTTP hook.
    pub url: String,
    /// The hard limit: past it the process group is killed, the request dropped.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            command: Vec::new(),
            url: String::new(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl HooksConfig {
    pub fn get(&self, point: &str) -> Option<&HookConfig> {
        self.0.get(point)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &HookConfig)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Adds one line per problem, `hooks.<point>[.<field>]: ...`.
    pub(super) fn problems(&self, out: &mut Vec<String>) {
        for (point, hook) in &self.0 {
            let key = format!("hooks.{point}");
            if !HOOK_POINTS.contains(&point.as_str()) {
                out.push(format!(
                    "{key}: unknown hook point (known: {})",
                    HOOK_POINTS.join(", ")
                ));
                continue;
            }
            match (hook.command.is_empty(), hook.url.is_empty()) {
                (true, true) => out.push(format!("{key}: set one of command or url")),
                (false, false) => {
                    out.push(format!("{key}: set command or url, not both"));
                }
                (false, true) => {
                    if hook.command[0].trim().is_empty() {
                        out.push(format!("{key}.command: must name the program first"));
                    }
                }
                (true, false) => {
                    if let Err(e) = http_url(&hook.url) {
                        let msg = e.message.as_deref().unwrap_or(&e.code).to_string();
                        out.push(format!("{key}.url: {msg}"));
                    }
                }
            }
            if hook.timeout < HOOK_TIMEOUT_MIN || hook.timeout > HOOK_TIMEOUT_MAX {
                out.push(format!("{key}.timeout: must be between 10ms and 60s"));
            }
        }
    }
}

/// What the environment loader coerces `PBXGATE__HOOKS__*` by: every known point, unset.
pub(super) fn env_template() -> toml::Table {
    let blank = toml::Table::try_from(HookConfig::default()).unwrap_or_default();
    HOOK_POINTS
        .iter()
        .map(|p| (p.to_string(), toml::Value::Table(blank.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{env, Config};

    fn problems(text: &str) -> Vec<String> {
        Config::from_toml_and_env(text, env(&[]))
            .unwrap_err()
            .problems
    }

    #[test]
    fn no_hooks_by_default_and_a_command_and_a_url_hook_load() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert!(c.hooks.is_empty());
        let c = Config::from_toml_and_env(
            r#"
            [hooks.need_registration]
            command = ["python3", "/etc/pbxgate/hooks/need_registration.py"]
            [hooks.process_call_params]
            url = "http://127.0.0.1:9000/process_call_params"
            timeout = "150ms"
            "#,
            env(&[]),
        )
        .unwrap();
        let need = c.hooks.get("need_registration").unwrap();
        assert_eq!(need.command[0], "python3");
        assert_eq!(need.timeout, Duration::from_secs(2));
        let params = c.hooks.get("process_call_params").unwrap();
        assert_eq!(params.url, "http://127.0.0.1:9000/process_call_params");
        assert_eq!(params.timeout, Duration::from_millis(150));
    }

    #[test]
    fn exactly_one_of_command_and_url() {
        let p = problems("[hooks.process_client_phone]\ntimeout = \"1s\"\n");
        assert_eq!(
            p,
            vec!["hooks.process_client_phone: set one of command or url"]
        );
        let p = problems(
            "[hooks.process_client_phone]\ncommand = [\"x\"]\nurl = \"http://127.0.0.1:1/\"\n",
        );
        assert_eq!(
            p,
            vec!["hooks.process_client_phone: set command or url, not both"]
        );
    }

    #[test]
    fn the_command_names_its_program_first() {
        let p = problems("[hooks.process_user_phone]\ncommand = [\" \", \"x\"]\n");
        assert_eq!(
            p,
            vec!["hooks.process_user_phone.command: must name the program first"]
        );
    }

    #[test]
    fn the_url_is_http_or_https() {
        for bad in [
            "ftp://127.0.0.1/x",
            "not a url",
            "http://127.0.0.1/x?key=secret",
        ] {
            let p = problems(&format!("[hooks.process_call_params]\nurl = {bad:?}\n"));
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with("hooks.process_call_params.url: "), "{p:?}");
        }
        let c = Config::from_toml_and_env(
            "[hooks.process_call_params]\nurl = \"https://hooks.example.com/p\"\n",
            env(&[]),
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn the_timeout_is_between_10ms_and_60s() {
        for bad in ["5ms", "61s", "0s"] {
            let p = problems(&format!(
                "[hooks.post_registration]\ncommand = [\"true\"]\ntimeout = {bad:?}\n"
            ));
            assert_eq!(
                p,
                vec!["hooks.post_registration.timeout: must be between 10ms and 60s"],
                "{bad}"
            );
        }
        for good in ["10ms", "60s"] {
            let text =
                format!("[hooks.post_registration]\ncommand = [\"true\"]\ntimeout = {good:?}\n");
            assert!(Config::from_toml_and_env(&text, env(&[])).is_ok(), "{good}");
        }
    }

    #[test]
    fn unknown_points_and_unknown_fields_are_named() {
        let p = problems("[hooks.need_registraton]\ncommand = [\"true\"]\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("hooks.need_registraton: unknown hook point"),
            "{p:?}"
        );
        let p = problems("[hooks.need_registration]\ncommand = [\"true\"]\nretries = 3\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("hooks") && p[0].contains("retries"), "{p:?}");
    }

    #[test]
    fn every_known_point_is_accepted() {
        let text: String = HOOK_POINTS
            .iter()
            .map(|p| format!("[hooks.{p}]\ncommand = [\"true\"]\n"))
            .collect();
        let c = Config::from_toml_and_env(&text, env(&[])).unwrap();
        assert_eq!(c.hooks.iter().count(), HOOK_POINTS.len());
    }

    #[test]
    fn the_environment_configures_a_known_point() {
        let c = Config::from_toml_and_env(
            "[hooks.need_registration]\ncommand = [\"python3\", \"a.py\"]\n",
            env(&[
                (
                    "PBXGATE__HOOKS__PROCESS_CALL_PARAMS__URL",
                    "http://127.0.0.1:9000/p",
                ),
                ("PBXGATE__HOOKS__PROCESS_CALL_PARAMS__TIMEOUT", "300ms"),
                ("PBXGATE__HOOKS__NEED_REGISTRATION__TIMEOUT", "1s"),
                (
                    "PBXGATE__HOOKS__POST_REGISTRATION",
                    "{command = [\"sh\", \"-c\", \"true\"]}",
                ),
            ]),
        )
        .unwrap();
        let p = c.hooks.get("process_call_params").unwrap();
        assert_eq!(
            (p.url.as_str(), p.timeout),
            ("http://127.0.0.1:9000/p", Duration::from_millis(300))
        );
        let n = c.hooks.get("need_registration").unwrap();
        assert_eq!((n.command.len(), n.timeout), (2, Duration::from_secs(1)));
        let post = c.hooks.get("post_registration").unwrap();
        assert_eq!(post.command, vec!["sh", "-c", "true"]);
        assert_eq!(post.timeout, Duration::from_secs(2));

        // A URL from the environment replaces a file's command only when told to clear it.
        let file = "[hooks.need_registration]\ncommand = [\"python3\", \"a.py\"]\n";
        let url = (
            "PBXGATE__HOOKS__NEED_REGISTRATION__URL",
            "http://127.0.0.1:9/n",
        );
        let e = Config::from_toml_and_env(file, env(&[url])).unwrap_err();
        assert_eq!(
            e.problems,
            vec!["hooks.need_registration: set command or url, not both"]
        );
        let c = Config::from_toml_and_env(
            file,
            env(&[url, ("PBXGATE__HOOKS__NEED_REGISTRATION__COMMAND", "[]")]),
        )
        .unwrap();
        assert_eq!(c.hooks.get("need_registration").unwrap().url, url.1);
    }

    #[test]
    fn the_environment_refuses_unknown_points_and_fields() {
        for var in [
            "PBXGATE__HOOKS__NOPE__URL",
            "PBXGATE__HOOKS__NEED_REGISTRATION__RETRIES",
        ] {
            let e = Config::from_toml_and_env("", env(&[(var, "1")])).unwrap_err();
            assert_eq!(e.problems.len(), 1);
            assert!(
                e.problems[0].contains("unknown key") && e.problems[0].contains(var),
                "{e}"
            );
        }
        let e = Config::from_toml_and_env(
            "",
            env(&[("PBXGATE__HOOKS__NEED_REGISTRATION__TIMEOUT", "soon")]),
        )
        .unwrap_err();
        assert!(
            e.problems[0].starts_with("hooks.need_registration.timeout:"),
            "{e}"
        );
    }
}
