//! The pbxgate widget inside Kommo: who is asking ([`verify`]) and what that user is shown
//! ([`card`]). The HTTP side is in `crate::http::kommo`.
//!
//! Kommo signs a disposable `X-Auth-Token` for every `$authorizedAjax` request of a widget: a
//! JWT, HS256 with the integration's client secret, carrying the account (`iss`, `account_id`)
//! and the Kommo user (`user_id`). Checked here: the algorithm (HS256 only: `none` and every
//! other one are refused before anything else is read), the signature (constant time), `exp`
//! and `nbf` with [`LEEWAY`], `iss` against the configured account, `account_id` when
//! configured, `user_id` present. Other widgets for Kommo trust a user id the browser sends;
//! ours comes from the signed token, so a user cannot act as another.
//!
//! A browser's `EventSource` cannot send a header, so the live card is opened with a ticket
//! ([`Tickets`]): the widget asks for one with its token, then opens the stream with it. A
//! ticket is random, bound to one user, used once, and must be used within [`TICKET_TTL`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

use crate::base::clock::Millis;
use crate::calls::{Direction, LiveCall};
use crate::config::KommoConfig;
use crate::crm::port::DirectoryEntry;

/// Clock difference tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY: i64 = 30;
/// Longest token read (Kommo's are well under 1 KiB).
pub const MAX_TOKEN: usize = 4096;
/// How long a stream ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Most tickets waiting at once; more are refused until some are used or expire.
pub const MAX_TICKETS: usize = 1024;

/// The Kommo user a valid token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidgetUser {
    pub user_id: i64,
    /// The token's `account_id` (0 when it carries none).
    pub account_id: i64,
}

/// Why a token is refused (answered to the widget with 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("missing")]
    Missing,
    /// Nothing can be verified without the key: every token is refused.
    #[error("cannot be checked: kommo.client_secret is not set")]
    NoSecret,
    #[error("not a JWT (three base64url parts, at most {MAX_TOKEN} bytes)")]
    Malformed,
    #[error("alg must be HS256, not {0}")]
    Algorithm(String),
    #[error("signature does not match the integration's client secret")]
    Signature,
    #[error("claim {0} is missing or not valid")]
    Claim(&'static str),
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("issued for another account ({0})")]
    Issuer(String),
    #[error("account_id {found} is not the configured {expected}")]
    Account { found: i64, expected: i64 },
}

fn b64(part: &str) -> Result<Vec<u8>, TokenProblem> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenProblem::Malformed)
}

/// A claim that must be an integer; Kommo writes numbers, a numeric string is taken too.
fn integer(claims: &Value, name: &'static str) -> Result<Option<i64>, TokenProblem> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(TokenProblem::Claim(name)),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| TokenProblem::Claim(name)),
        Some(_) => Err(TokenProblem::Claim(name)),
    }
}

/// Host and port of an account address (`https://acme.kommo.com/`, `acme.kommo.com`),
/// lowercase; the scheme and a trailing slash do not matter.
fn account_host(address: &str) -> Option<String> {
    let address = address.trim();
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let url = url::Url::parse(&with_scheme).ok()?;
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// Checks a widget's `X-Auth-Token` against `config` at `now` (Unix seconds).
pub fn verify(token: &str, config: &KommoConfig, now: i64) -> Result<WidgetUser, TokenProblem> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenProblem::Missing);
    }
    if config.client_secret.is_empty() {
        return Err(TokenProblem::NoSecret);
    }
    if token.len() > MAX_TOKEN {
        return Err(TokenProblem::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenProblem::Malformed);
    };
    let header: Value = serde_json::from_slice(&b64(head)?).map_err(|_| TokenProblem::Malformed)?;
    match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => {}
        Some(other) => {
            return Err(TokenProblem::Algorithm(
                other.chars().take(20).collect::<String>(),
            ))
        }
        None => return Err(TokenProblem::Algorithm("(none given)".into())),
    }
    let signature = b64(signature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(config.client_secret.expose().as_bytes())
        .map_err(|_| TokenProblem::NoSecret)?;
    mac.update(head.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| TokenProblem::Signature)?;

    // Signed by us from here on: the claims are Kommo's.
    let claims: Value = serde_json::from_slice(&b64(body)?).map_err(|_| TokenProblem::Malformed)?;
    if !claims.is_object() {
        return Err(TokenProblem::Malformed);
    }
    let exp = integer(&claims, "exp")?.ok_or(TokenProblem::Claim("exp"))?;
    if now > exp.saturating_add(LEEWAY) {
        return Err(TokenProblem::Expired);
    }
    if let Some(nbf) = integer(&claims, "nbf")? {
        if now.saturating_add(LEEWAY) < nbf {
            return Err(TokenProblem::NotYetValid);
        }
    }
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(TokenProblem::Claim("iss"))?;
    let ours = account_host(&config.base_url);
    if ours.is_none() || account_host(iss) != ours {
        return Err(TokenProblem::Issuer(iss.chars().take(100).collect()));
    }
    let account_id = integer(&claims, "account_id")?.unwrap_or(0);
    if config.account_id != 0 && account_id != config.account_id {
        return Err(TokenProblem::Account {
            found: account_id,
            expected: config.account_id,
        });
    }
    let user_id = integer(&claims, "user_id")?
        .filter(|id| *id > 0)
        .ok_or(TokenProblem::Claim("user_id"))?;
    Ok(WidgetUser {
        user_id,
        account_id,
    })
}

/// The extension of a Kommo user (`[[users]]`), if they have one.
pub fn extension_of(directory: &[DirectoryEntry], user_id: i64) -> Option<String> {
    directory
        .iter()
        .find(|d| d.user_id == user_id)
        .map(|d| d.code.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CardState {
    Ringing,
    Talking,
}

/// One call on a user's card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardCall {
    /// pbxgate's id of the call.
    pub id: String,
    /// The customer's number.
    pub phone: String,
    /// `in`, `out` or `internal`.
    pub direction: &'static str,
    pub state: CardState,
    /// Since when it is in that state (Unix ms): the start while ringing, the answer once
    /// talking.
    pub since: Millis,
    /// Seconds in that state at `now`.
    pub seconds: i64,
    /// Kommo's contact search for the number.
    pub contact_url: String,
}

/// What a user's widget shows: their extension's ringing and talking calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Card {
    pub extension: String,
    /// When it was made (Unix ms), to count durations on from.
    pub now: Millis,
    pub calls: Vec<CardCall>,
}

impl Card {
    /// What changes the card other than time passing.
    pub fn key(&self) -> Vec<(&str, CardState)> {
        self.calls
            .iter()
            .map(|c| (c.id.as_str(), c.state))
            .collect()
    }
}

/// `{origin}/contacts/list/contacts/?term=<number>`.
pub fn contact_url(origin: &str, phone: &str) -> String {
    let term: String = url::form_urlencoded::byte_serialize(phone.as_bytes()).collect();
    format!(
        "{}/contacts/list/contacts/?term={term}",
        origin.trim_end_matches('/')
    )
}

/// The card of extension `code` among `calls` at `now`; `origin` is the account's.
pub fn card(calls: &[LiveCall], code: &str, origin: &str, now: Millis) -> Card {
    let mine = calls.iter().filter_map(|c| {
        let (state, since) = if c.talking.iter().any(|e| e == code) {
            (CardState::Talking, c.answered.unwrap_or(c.start))
        } else if c.ringing.iter().any(|e| e == code) {
            (CardState::Ringing, c.start)
        } else {
            return None;
        };
        Some(CardCall {
            id: c.external_id.clone(),
            phone: c.phone.clone(),
            direction: match c.direction {
                Direction::In => "in",
                Direction::Out => "out",
                Direction::Internal => "internal",
            },
            state,
            since,
            seconds: (now - since).max(0) / 1000,
            contact_url: contact_url(origin, &c.phone),
        })
    });
    Card {
        extension: code.to_string(),
        now,
        calls: mine.collect(),
    }
}

/// Whom a ticket was given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketHolder {
    pub user_id: i64,
    pub extension: String,
}

struct Waiting {
    holder: TicketHolder,
    until: Instant,
}

/// Stream tickets waiting to be used (in memory: a restart only makes widgets ask again).
#[derive(Default)]
pub struct Tickets(Mutex<HashMap<String, Waiting>>);

impl Tickets {
    /// A new ticket for `holder`, or `None` while [`MAX_TICKETS`] are waiting.
    pub fn issue(&self, holder: TicketHolder, now: Instant) -> Option<String> {
        let mut waiting = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= MAX_TICKETS {
            waiting.retain(|_, w| w.until > now);
            if waiting.len() >= MAX_TICKETS {
                return None;
            }
        }
        let bytes: [u8; 24] = rand::random();
        let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        waiting.insert(
            ticket.clone(),
            Waiting {
                holder,
                until: now + TICKET_TTL,
            },
        );
        Some(ticket)
    }

    /// The holder of a valid ticket, which is used up; `None` for an unknown, used or expired
    /// one.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<TicketHolder> {
        let mut waiting = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = waiting.remove(ticket)?;
        (w.until > now).then_some(w.holder)
    }

    pub fn waiting(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::secret::Secret;

    const SECRET: &str = "integration-secret-0123456789";
    const NOW: i64 = 1_795_255_200;

    fn config() -> KommoConfig {
        KommoConfig {
            base_url: "https://acme.kommo.com".into(),
            client_secret: Secret::new(SECRET),
            ..KommoConfig::default()
        }
    }

    fn sign(header: &Value, claims: &Value, key: &str) -> String {
        let enc = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let signed = format!("{}.{}", enc(header), enc(claims));
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    fn claims() -> Value {
        serde_json::json!({
            "iss": "https://acme.kommo.com", "aud": "https://pbx.example.com",
            "jti": "a1", "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 1800,
            "account_id": 31337, "subdomain": "acme", "user_id": 8320148,
            "client_uuid": "c-1", "is_admin": false
        })
    }

    fn token(claims: &Value) -> String {
        sign(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            claims,
            SECRET,
        )
    }

    #[test]
    fn a_kommo_token_names_its_user() {
        let user = verify(&token(&claims()), &config(), NOW).unwrap();
        assert_eq!(
            user,
            WidgetUser {
                user_id: 8320148,
                account_id: 31337
            }
        );
        let mut c = config();
        c.account_id = 31337;
        c.base_url = "https://ACME.kommo.com/".into();
        assert!(verify(&token(&claims()), &c, NOW).is_ok());
    }

    #[test]
    fn every_problem_is_named() {
        let c = config();
        let with = |k: &str, v: Value| {
            let mut cl = claims();
            cl[k] = v;
            token(&cl)
        };
        assert_eq!(verify("", &c, NOW), Err(TokenProblem::Missing));
        assert_eq!(verify("a.b", &c, NOW), Err(TokenProblem::Malformed));
        assert_eq!(
            verify(
                &sign(&serde_json::json!({"alg":"HS256"}), &claims(), "other"),
                &c,
                NOW
            ),
            Err(TokenProblem::Signature)
        );
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_eq!(
            verify(&none, &c, NOW),
            Err(TokenProblem::Algorithm("none".into()))
        );
        assert_eq!(
            verify(
                &sign(&serde_json::json!({"alg":"HS512"}), &claims(), SECRET),
                &c,
                NOW
            ),
            Err(TokenProblem::Algorithm("HS512".into()))
        );
        assert_eq!(
            verify(&with("exp", (NOW - LEEWAY - 1).into()), &c, NOW),
            Err(TokenProblem::Expired)
        );
        assert!(
            verify(&with("exp", (NOW - 5).into()), &c, NOW).is_ok(),
            "leeway"
        );
        assert_eq!(
            verify(&with("nbf", (NOW + 600).into()), &c, NOW),
            Err(TokenProblem::NotYetValid)
        );
        assert!(matches!(
            verify(&with("iss", "https://evil.kommo.com".into()), &c, NOW),
            Err(TokenProblem::Issuer(_))
        ));
        assert!(verify(&with("iss", "acme.kommo.com/".into()), &c, NOW).is_ok());
        assert_eq!(
            verify(&with("user_id", Value::Null), &c, NOW),
            Err(TokenProblem::Claim("user_id"))
        );
        assert_eq!(
            verify(&with("exp", "soon".into()), &c, NOW),
            Err(TokenProblem::Claim("exp"))
        );
        let mut fixed = config();
        fixed.account_id = 1;
        assert_eq!(
            verify(&token(&claims()), &fixed, NOW),
            Err(TokenProblem::Account {
                found: 31337,
                expected: 1
            })
        );
        let mut keyless = config();
        keyless.client_secret = Secret::default();
        assert_eq!(
            verify(&token(&claims()), &keyless, NOW),
            Err(TokenProblem::NoSecret),
            "an empty key verifies nothing"
        );
    }

    fn live(id: &str, ringing: &[&str], talking: &[&str]) -> LiveCall {
        LiveCall {
            external_id: id.into(),
            direction: Direction::In,
            phone: "+79991234567".into(),
            start: 1_000,
            ringing: ringing.iter().map(|s| s.to_string()).collect(),
            talking: talking.iter().map(|s| s.to_string()).collect(),
            answered: (!talking.is_empty()).then_some(6_000),
        }
    }

    #[test]
    fn a_card_shows_only_the_users_calls() {
        let calls = [
            live("a", &["101", "102"], &[]),
            live("b", &[], &["101"]),
            live("c", &["102"], &[]),
        ];
        let card = card(&calls, "101", "https://acme.kommo.com", 16_500);
        assert_eq!(
            card.key(),
            vec![("a", CardState::Ringing), ("b", CardState::Talking)]
        );
        assert_eq!((card.calls[0].seconds, card.calls[1].seconds), (15, 10));
        assert_eq!(
            card.calls[0].contact_url,
            "https://acme.kommo.com/contacts/list/contacts/?term=%2B79991234567"
        );
        assert!(super::card(&calls, "103", "https://acme.kommo.com", 0)
            .calls
            .is_empty());
    }

    #[test]
    fn tickets_are_single_use_and_short_lived() {
        let t = Tickets::default();
        let now = Instant::now();
        let holder = TicketHolder {
            user_id: 7,
            extension: "101".into(),
        };
        let a = t.issue(holder.clone(), now).unwrap();
        assert_eq!(t.redeem(&a, now), Some(holder.clone()));
        assert_eq!(t.redeem(&a, now), None, "used once");
        let b = t.issue(holder.clone(), now).unwrap();
        assert_eq!(t.redeem(&b, now + TICKET_TTL), None, "expired");
        assert_eq!(t.redeem("forged", now), None);
        for _ in 0..MAX_TICKETS {
            t.issue(holder.clone(), now).unwrap();
        }
        assert!(t.issue(holder.clone(), now).is_none(), "bounded");
        assert!(
            t.issue(holder, now + TICKET_TTL).is_some(),
            "expired ones make room"
        );
        assert_eq!(t.waiting(), 1);
    }
}
