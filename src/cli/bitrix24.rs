//! `pbxgate bitrix24 auth [--code CODE]`: grants pbxgate access to the portal as a local
//! application (OAuth). Without `--code` it prints the page a portal administrator opens; with
//! the code the portal handed out there, it fetches the first tokens and stores them, and the
//! service refreshes them from then on. Tokens are never printed.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::crm::bitrix24::oauth::{authorize_url, exchange_code};
use crate::crm::bitrix24::B24Error;
use crate::store::{Store, StoreError};

#[derive(Debug, Subcommand)]
pub enum Bitrix24Command {
    /// Authorise pbxgate as the portal's local application (OAuth): prints the page to open,
    /// or, with --code, stores the tokens (run it with the service stopped).
    Auth {
        /// The `code` the portal put in the address it redirected to (or that whole address).
        #[arg(long, value_name = "CODE")]
        code: Option<String>,
    },
}

pub async fn run(config: &Config, command: Bitrix24Command) -> ExitCode {
    match command {
        Bitrix24Command::Auth { code } => auth(config, code.as_deref()).await,
    }
}

async fn auth(config: &Config, code: Option<&str>) -> ExitCode {
    let b24 = &config.bitrix24;
    if !b24.uses_oauth() {
        if b24.webhook_url.is_empty() {
            eprintln!(
                "pbxgate: OAuth is not configured: set bitrix24.portal, bitrix24.client_id and \
                 bitrix24.client_secret (the keys of the local application created in the portal \
                 under Developer resources → Other → Local application)"
            );
        } else {
            eprintln!(
                "pbxgate: bitrix24.webhook_url is set, so pbxgate uses the inbound webhook and \
                 no OAuth tokens; clear it (and set bitrix24.portal, client_id, client_secret) to \
                 use a local application instead"
            );
        }
        return ExitCode::from(2);
    }
    let Some(code) = code else {
        println!(
            "To authorise pbxgate as the local application {} on {}:\n\
             1. Logged in to the portal as an administrator, open\n   {}\n\
             2. The portal redirects to the application's handler address; copy the `code` \
             parameter of that address (it works once, for about 30 seconds).\n\
             3. With the service stopped, run\n   pbxgate bitrix24 auth --code <CODE>\n   \
             (the whole redirect address is accepted too), then start the service.",
            b24.client_id,
            b24.portal_origin(),
            authorize_url(config)
        );
        return ExitCode::SUCCESS;
    };
    let code = code_of(code);
    let store = match Store::open(&config.storage.path) {
        Ok(store) => store,
        Err(StoreError::Locked { path }) => {
            eprintln!(
                "pbxgate: the store {} is held by the running pbxgate service: stop the service \
                 first (e.g. `systemctl stop pbxgate`), then run this again with a new code and \
                 start the service",
                path.display()
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(1);
        }
    };
    let state = match store.crm_state() {
        Ok(state) => state,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(1);
        }
    };
    match exchange_code(config, &state, &code).await {
        Ok(tokens) => {
            let user = tokens
                .user_id
                .map_or_else(|| "unknown".to_string(), |u| u.to_string());
            println!(
                "authorised on {}: portal member_id {}, user {user}; the access token is valid \
                 until {}.\nThe tokens are stored in {}; the service refreshes them by itself.",
                b24.portal_origin(),
                if tokens.member_id.is_empty() {
                    "unknown"
                } else {
                    &tokens.member_id
                },
                tokens.expires_at(),
                config.storage.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(B24Error::GrantExpired { .. }) => {
            eprintln!(
                "pbxgate: the OAuth server refused the code (invalid_grant): a code works once \
                 and for about 30 seconds; run `pbxgate bitrix24 auth` for a new one"
            );
            ExitCode::from(1)
        }
        Err(e) => {
            match e.operator_hint() {
                Some(hint) => eprintln!("pbxgate: {e}\n{hint}"),
                None => eprintln!("pbxgate: {e}"),
            }
            ExitCode::from(1)
        }
    }
}

/// The code itself, from the code or from the whole address the portal redirected to.
fn code_of(given: &str) -> String {
    let given = given.trim();
    let query = match url::Url::parse(given) {
        Ok(url) => url.query().map(str::to_string),
        Err(_) if given.contains("code=") => Some(given.trim_start_matches('?').to_string()),
        Err(_) => None,
    };
    query
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "code")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_else(|| given.to_string())
}

#[cfg(test)]
mod tests {
    use super::code_of;

    #[test]
    fn the_code_is_taken_from_a_redirect_address_too() {
        assert_eq!(code_of(" abc123 "), "abc123");
        assert_eq!(
            code_of("https://app.example/handler?code=xyz%2B1&domain=acme.bitrix24.ru&member_id=m"),
            "xyz+1"
        );
        assert_eq!(code_of("code=q1&state=s"), "q1");
    }
}
