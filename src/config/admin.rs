//! `[admin]`: access to the dashboard and the admin API (`/admin/...`).

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError};

use super::checks::problem;
use crate::base::secret::Secret;

/// The shortest admin token accepted (when one is set).
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Required by `/admin/...` as `Authorization: Bearer <token>` or through the login form.
    /// Empty: the admin routes are open while `http.listen` is a loopback address, and refused
    /// (403) otherwise.
    #[validate(custom(function = "admin_token"))]
    pub token: Secret,
    /// Show customers' numbers in full on the dashboard and in the admin API (masked otherwise).
    pub show_numbers: bool,
}

fn admin_token(token: &Secret) -> Result<(), ValidationError> {
    let len = token.expose().chars().count();
    if len > 0 && len < MIN_TOKEN_LEN {
        return Err(problem(format!(
            "must be at least {MIN_TOKEN_LEN} characters (or empty)"
        )));
    }
    if token.expose().chars().any(|c| c.is_control() || c == ' ') {
        return Err(problem("must not contain spaces or control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_short_token_is_refused_and_the_env_sets_it() {
        let e = Config::from_toml_and_env("[admin]\ntoken = \"short\"\n", Vec::new()).unwrap_err();
        assert!(
            e.to_string().contains("admin.token: must be at least 16"),
            "{e}"
        );
        let c = Config::from_toml_and_env(
            "",
            vec![(
                "PBXGATE__ADMIN__TOKEN".to_string(),
                "0123456789abcdef".to_string(),
            )],
        )
        .unwrap();
        assert!(c.admin.token.matches("0123456789abcdef"));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
