//! `pbxgate kommo auth [--code CODE]`: grants pbxgate access to the Kommo account as an OAuth
//! integration. Without `--code` it says where the authorization code is; with it, it fetches
//! the first tokens and stores them, and the service refreshes them from then on. Tokens are
//! never printed.
//!
//! `pbxgate kommo widget [--out FILE]`: writes the widget's archive to upload into the
//! integration ([`super::kommo_widget`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::crm::kommo::oauth::exchange_code;
use crate::crm::kommo::KommoError;
use crate::store::{Store, StoreError};

#[derive(Debug, Subcommand)]
pub enum KommoCommand {
    /// Authorise pbxgate as the account's OAuth integration: says where the code is, or, with
    /// --code, stores the tokens (run it with the service stopped).
    Auth {
        /// The authorization code from the integration's page in Kommo, or the `code` of the
        /// address Kommo redirected to (that whole address is accepted too).
        #[arg(long, value_name = "CODE")]
        code: Option<String>,
    },
    /// Write the widget's archive (click-to-call in Kommo) to upload into the integration.
    Widget {
        /// Where to write the zip.
        #[arg(long, value_name = "FILE", default_value = "pbxgate-kommo-widget.zip")]
        out: PathBuf,
    },
}

pub async fn run(config: &Config, command: KommoCommand) -> ExitCode {
    match command {
        KommoCommand::Auth { code } => auth(config, code.as_deref()).await,
        KommoCommand::Widget { out } => {
            match super::kommo_widget::write(&out, &config.http.public_url) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pbxgate: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn auth(config: &Config, code: Option<&str>) -> ExitCode {
    let kommo = &config.kommo;
    if !kommo.uses_oauth() {
        if kommo.long_lived_token.is_empty() {
            eprintln!(
                "pbxgate: OAuth is not configured: set kommo.client_id, kommo.client_secret and \
                 kommo.redirect_uri (from the integration's Keys and scopes tab in Kommo), or \
                 use a private integration's kommo.long_lived_token instead"
            );
        } else {
            eprintln!(
                "pbxgate: kommo.long_lived_token is set, so pbxgate uses it and needs no OAuth \
                 tokens; clear it (and set kommo.client_id, client_secret, redirect_uri) to use \
                 OAuth instead"
            );
        }
        return ExitCode::from(2);
    }
    let Some(code) = code else {
        println!(
            "To authorise pbxgate as the integration {} on {}:\n\
             1. Get an authorization code, either\n   \
             - in Kommo, as an administrator: Settings → Integrations → the integration → \
             Keys and scopes → Authorization code (copy it), or\n   \
             - by installing the integration: Kommo redirects to {} with `code` in the \
             address (copy the code, or the whole address).\n   \
             A code works once, for about 20 minutes.\n\
             2. With the service stopped, run\n   pbxgate kommo auth --code <CODE>\n   \
             then start the service; it refreshes the tokens by itself.",
            kommo.client_id,
            kommo.origin(),
            kommo.redirect_uri
        );
        return ExitCode::SUCCESS;
    };
    let (code, referer) = code_of(code);
    if let Some(referer) = referer {
        if !same_host(&referer, &kommo.origin()) {
            eprintln!(
                "pbxgate: the code was issued by {referer}, but kommo.base_url is {}: set \
                 kommo.base_url to the account's address, then run this again",
                kommo.origin()
            );
            return ExitCode::from(2);
        }
    }
    let store = match Store::open(&config.storage.path) {
        Ok(store) => store,
        Err(StoreError::Locked { path }) => {
            eprintln!(
                "pbxgate: the store {} is held by the running pbxgate service: stop the service \
                 first (e.g. `systemctl stop pbxgate`), then run this again and start the \
                 service",
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
            println!(
                "authorised on {}: the access token is valid until {}.\nThe tokens are stored \
                 in {}; the service refreshes them by itself.",
                kommo.origin(),
                tokens.expiry(),
                config.storage.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(KommoError::GrantRevoked { detail, .. }) => {
            eprintln!(
                "pbxgate: Kommo refused the code ({detail}): a code works once and for about \
                 20 minutes; get a new one (`pbxgate kommo auth` says where)"
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("pbxgate: {}", e.with_hint());
            ExitCode::from(1)
        }
    }
}

/// The code, from the code itself or from the whole address Kommo redirected to; and that
/// address's `referer` (the account's host), if it has one.
fn code_of(given: &str) -> (String, Option<String>) {
    let given = given.trim();
    let query = match url::Url::parse(given) {
        Ok(url) => url.query().map(str::to_string),
        Err(_) if given.contains("code=") => Some(given.trim_start_matches('?').to_string()),
        Err(_) => None,
    };
    let Some(query) = query else {
        return (given.to_string(), None);
    };
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let find = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match find("code") {
        Some(code) => (code, find("referer").filter(|r| !r.is_empty())),
        None => (given.to_string(), None),
    }
}

/// Whether `referer` (a host, maybe with a scheme) is the host of `origin`.
fn same_host(referer: &str, origin: &str) -> bool {
    let host = |s: &str| {
        let s = s.trim().trim_end_matches('/');
        let s = s.split_once("://").map_or(s, |(_, rest)| rest);
        s.split(['/', ':'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    host(referer) == host(origin)
}

#[cfg(test)]
mod tests {
    use super::{code_of, same_host};

    #[test]
    fn the_code_is_taken_from_a_redirect_address_too() {
        assert_eq!(code_of(" def502 "), ("def502".to_string(), None));
        assert_eq!(
            code_of("https://app.example/kommo?code=def%2B1&state=s&referer=acme.kommo.com"),
            ("def+1".to_string(), Some("acme.kommo.com".to_string()))
        );
        assert_eq!(code_of("code=q1&state=s"), ("q1".to_string(), None));
    }

    #[test]
    fn the_referer_must_be_the_configured_account() {
        assert!(same_host("acme.kommo.com", "https://acme.kommo.com"));
        assert!(same_host(
            "https://ACME.kommo.com/",
            "https://acme.kommo.com"
        ));
        assert!(!same_host("other.kommo.com", "https://acme.kommo.com"));
        assert!(same_host("127.0.0.1", "http://127.0.0.1:8080"));
    }
}
