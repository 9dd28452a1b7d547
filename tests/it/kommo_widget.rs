//! The Kommo widget's endpoints: click-to-call with Kommo's signed `X-Auth-Token` (tokens minted
//! here with an independent JWT library, as Kommo would), CORS for the account's origin only,
//! the call card's ticketed event stream; and the widget's script in headless Chromium against
//! a small stub of Kommo's widget API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pbxgate::base::secret::Secret;
use pbxgate::config::{CrmKind, UserCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dashboard::{Browser, BROWSER};
use crate::support::{lab_app, TestApp};

const SECRET: &str = "kommo-client-secret-0123456789";
const PBX_TOKEN: &str = "kommo-pbx-token-0123456789";
const ORIGIN: &str = "https://acme.kommo.com";
const ACCOUNT: i64 = 31337;
const USER: i64 = 8320148;
const OTHER_USER: i64 = 8320149;

/// pbxgate with Kommo as its CRM (account `origin`), users 8320148 → 101 and 8320149 → 102,
/// PBX webhooks on, AMI up.
async fn kommo_app(origin: &str) -> TestApp {
    let origin = origin.to_string();
    lab_app(move |c| {
        c.crm.kind = CrmKind::Kommo;
        c.kommo.base_url = origin;
        c.kommo.client_secret = Secret::new(SECRET);
        c.kommo.account_id = ACCOUNT;
        c.users = vec![
            UserCode {
                user_id: USER as u64,
                code: "101".into(),
            },
            UserCode {
                user_id: OTHER_USER as u64,
                code: "102".into(),
            },
        ];
        c.pbx.token = Secret::new(PBX_TOKEN);
    })
    .await
}

fn now() -> i64 {
    i64::try_from(pbxgate::base::clock::unix_now()).unwrap()
}

/// The claims Kommo puts in a widget's token (§4 of the reference).
fn claims(iss: &str, user_id: i64) -> Value {
    json!({
        "iss": iss, "aud": "https://pbx.example.com", "jti": "6f1c-4b2a",
        "iat": now() - 5, "nbf": now() - 5, "exp": now() + 1800,
        "account_id": ACCOUNT, "subdomain": "acme", "user_id": user_id,
        "client_uuid": "0b7f5c1e", "is_admin": false
    })
}

fn sign_with(alg: Algorithm, claims: &Value, key: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with(Algorithm::HS256, claims, SECRET)
}

fn token_for(user_id: i64) -> String {
    sign(&claims(ORIGIN, user_id))
}

/// An unsigned token (`alg: none`).
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

async fn call_with(app: &TestApp, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = app.http.post(app.url("/kommo/call")).json(&body);
    if let Some(t) = token {
        req = req.header("X-Auth-Token", t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn ringing(app: &TestApp, call_id: &str, phone: &str, extension: &str) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(PBX_TOKEN)
        .json(&json!([
            {"call_id": call_id, "event": "start", "direction": "in", "phone": phone},
            {"call_id": call_id, "event": "ringing", "extension": extension}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn webhook(app: &TestApp, event: Value) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(PBX_TOKEN)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_valid_token_calls_from_the_users_own_extension() {
    let app = kommo_app(ORIGIN).await;
    let (status, body) = call_with(
        &app,
        Some(&token_for(USER)),
        json!({"phone": "+7 (999) 123-45-67"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    assert_eq!(o.get("Exten"), Some("+79991234567"));
    assert_eq!(body["callId"], o.get("ChannelId").unwrap());
    let vars: Vec<&str> = o.get_all("Variable").collect();
    assert!(
        vars.contains(&format!("__PBXGATE_USER_ID={USER}").as_str()),
        "{vars:?}"
    );

    // A form body, as `$authorizedAjax` sends `data: {phone}`; the other user's extension.
    let r = app
        .http
        .post(app.url("/kommo/call"))
        .header("X-Auth-Token", token_for(OTHER_USER))
        .form(&[("phone", "8 999 765-43-21")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let o = &app.ami.wait_for_actions("Originate", 2).await[1];
    assert_eq!(o.get("Channel"), Some("Local/102@from-internal"));
    assert_eq!(o.get("Exten"), Some("89997654321"));
}

#[tokio::test]
async fn refused_tokens_are_401_naming_the_header_and_nothing_is_originated() {
    let app = kommo_app(ORIGIN).await;
    let mut expired = claims(ORIGIN, USER);
    expired["iat"] = json!(now() - 7200);
    expired["nbf"] = json!(now() - 7200);
    expired["exp"] = json!(now() - 3600);
    let mut early = claims(ORIGIN, USER);
    early["nbf"] = json!(now() + 3600);
    let mut other_account = claims(ORIGIN, USER);
    other_account["account_id"] = json!(999);
    let mut no_user = claims(ORIGIN, USER);
    no_user.as_object_mut().unwrap().remove("user_id");
    let good = token_for(USER);
    let (head, rest) = good.split_once('.').unwrap();
    let tampered = {
        // The same signature over a payload naming another user.
        let sig = rest.rsplit_once('.').unwrap().1;
        let other = token_for(OTHER_USER);
        let payload = other.split('.').nth(1).unwrap();
        format!("{head}.{payload}.{sig}")
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing"),
        ("empty", Some(String::new()), "missing"),
        ("garbage", Some("not-a-jwt".into()), "not a JWT"),
        (
            "forged signature",
            Some(sign_with(
                Algorithm::HS256,
                &claims(ORIGIN, USER),
                "someone-elses-secret",
            )),
            "signature",
        ),
        ("tampered payload", Some(tampered), "signature"),
        ("alg none", Some(unsigned(&claims(ORIGIN, USER))), "HS256"),
        (
            "HS512",
            Some(sign_with(Algorithm::HS512, &claims(ORIGIN, USER), SECRET)),
            "HS256",
        ),
        ("expired", Some(sign(&expired)), "expired"),
        ("not yet valid", Some(sign(&early)), "nbf"),
        (
            "another account's issuer",
            Some(sign(&claims("https://rival.kommo.com", USER))),
            "another account",
        ),
        (
            "another account id",
            Some(sign(&other_account)),
            "account_id",
        ),
        ("no user", Some(sign(&no_user)), "user_id"),
    ];
    for (what, token, reason) in &cases {
        let (status, body) =
            call_with(&app, token.as_deref(), json!({"phone": "+79991234567"})).await;
        assert_eq!(status, 401, "{what}: {body}");
        let named = body["errors"]["X-Auth-Token"].as_str().unwrap_or_default();
        assert!(named.contains(reason), "{what}: {body}");
        // The stream's ticket is refused the same way.
        let r = app
            .http
            .post(app.url("/kommo/stream"))
            .header("X-Auth-Token", token.clone().unwrap_or_default())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{what}: ticket");
    }

    // A signed user with no extension: 409 naming user_id; a bad number: 400 naming phone.
    let (status, body) = call_with(
        &app,
        Some(&token_for(555)),
        json!({"phone": "+79991234567"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["errors"]["user_id"].as_str().unwrap().contains("555"));
    for bad in [json!({"phone": "call me"}), json!({"phone": ""}), json!({})] {
        let (status, body) = call_with(&app, Some(&good), bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["errors"]["phone"].is_string(), "{bad}: {body}");
    }

    // Proof the PBX saw none of them: the next valid call is the first Originate.
    let (status, body) = call_with(&app, Some(&good), json!({"phone": "+79991234567"})).await;
    assert_eq!(status, 200, "{body}");
    app.ami.wait_for_actions("Originate", 1).await;
    assert_eq!(app.ami.actions("Originate").len(), 1);
}

#[tokio::test]
async fn cors_is_answered_for_the_account_origin_only() {
    let app = kommo_app(ORIGIN).await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/kommo/call"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "x-auth-token, content-type",
            )
            .send()
    };
    let r = preflight(ORIGIN).await.unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("X-Auth-Token") && allowed.contains("Content-Type"));
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(h["vary"], "Origin");

    let r = preflight("https://evil.example.com").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r.headers().get("access-control-allow-headers").is_none());

    // A refusal to the account's page carries the header, so the widget can read why.
    let r = app
        .http
        .post(app.url("/kommo/call"))
        .header("Origin", ORIGIN)
        .header("X-Auth-Token", "not-a-jwt")
        .json(&json!({"phone": "+79991234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);

    // Another site, even with a valid token: refused, no CORS header, nothing dialled.
    let r = app
        .http
        .post(app.url("/kommo/call"))
        .header("Origin", "https://evil.example.com")
        .header("X-Auth-Token", token_for(USER))
        .json(&json!({"phone": "+79991234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["Origin"].is_string(), "{body}");

    let r = app
        .http
        .post(app.url("/kommo/call"))
        .header("Origin", ORIGIN)
        .header("X-Auth-Token", token_for(USER))
        .json(&json!({"phone": "+79990000001"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
    app.ami.wait_for_actions("Originate", 1).await;
    assert_eq!(app.ami.actions("Originate").len(), 1);
    assert_eq!(
        app.ami.actions("Originate")[0].get("Exten"),
        Some("+79990000001")
    );
}

/// An open call-card stream, read event by event.
struct Stream {
    res: reqwest::Response,
    buf: String,
}

impl Stream {
    async fn open(app: &TestApp, user_id: i64) -> Stream {
        let r = app
            .http
            .post(app.url("/kommo/stream"))
            .header("X-Auth-Token", token_for(user_id))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ticket = r.json::<Value>().await.unwrap()["ticket"]
            .as_str()
            .unwrap()
            .to_string();
        let res = app
            .http
            .get(app.url("/kommo/events"))
            .query(&[("ticket", &ticket)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        // Used once.
        let again = app
            .http
            .get(app.url("/kommo/events"))
            .query(&[("ticket", &ticket)])
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 401);
        Stream {
            res,
            buf: String::new(),
        }
    }

    /// The next `card` event's data.
    async fn card(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                while let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    if block.lines().any(|l| l == "event: card") {
                        let data = block
                            .lines()
                            .find_map(|l| l.strip_prefix("data: "))
                            .unwrap();
                        return serde_json::from_str(data).unwrap();
                    }
                }
                let chunk = self
                    .res
                    .chunk()
                    .await
                    .unwrap()
                    .expect("the stream stays open");
                self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("a card event")
    }

    /// The next card with a call.
    async fn card_with_calls(&mut self) -> Value {
        loop {
            let card = self.card().await;
            if !card["calls"].as_array().unwrap().is_empty() {
                return card;
            }
        }
    }
}

#[tokio::test]
async fn the_stream_shows_a_users_calls_and_no_one_elses() {
    let app = kommo_app(ORIGIN).await;
    let mut mine = Stream::open(&app, USER).await;
    let mut theirs = Stream::open(&app, OTHER_USER).await;
    let first = mine.card().await;
    assert_eq!(first["extension"], "101");
    assert_eq!(first["calls"], json!([]));
    assert_eq!(theirs.card().await["calls"], json!([]));

    ringing(&app, "k1", "+7 999 123-45-67", "101").await;
    let card = mine.card_with_calls().await;
    let call = &card["calls"][0];
    assert_eq!(card["calls"].as_array().unwrap().len(), 1, "{card}");
    assert_eq!(call["phone"], "+79991234567");
    assert_eq!(call["state"], "ringing");
    assert_eq!(call["direction"], "in");
    assert!(call["seconds"].as_i64().unwrap() >= 0);
    assert_eq!(
        call["contact_url"],
        format!("{ORIGIN}/contacts/list/contacts/?term=%2B79991234567")
    );

    // 102's first call on its card is its own: it never saw 101's.
    ringing(&app, "k2", "+7 999 000-00-02", "102").await;
    let card = theirs.card_with_calls().await;
    let calls = card["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{card}");
    assert_eq!(calls[0]["phone"], "+79990000002");

    // Answered by 101: talking.
    webhook(
        &app,
        json!({"call_id": "k1", "event": "answer", "extension": "101"}),
    )
    .await;
    let card = loop {
        let card = mine.card().await;
        if card["calls"][0]["state"] == "talking" {
            break card;
        }
    };
    assert_eq!(card["calls"][0]["phone"], "+79991234567");
    // Hung up: the card empties.
    webhook(&app, json!({"call_id": "k1", "event": "hangup"})).await;
    loop {
        if mine.card().await["calls"] == json!([]) {
            break;
        }
    }
}

#[tokio::test]
async fn a_bad_ticket_is_401_and_other_crms_have_no_widget() {
    let app = kommo_app(ORIGIN).await;
    for query in ["", "?ticket=", "?ticket=forged-ticket-0123456789"] {
        let r = app
            .http
            .get(app.url(&format!("/kommo/events{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{query}");
        let body: Value = r.json().await.unwrap();
        assert!(body["errors"]["ticket"].is_string(), "{body}");
    }
    // A user with no extension gets no ticket.
    let r = app
        .http
        .post(app.url("/kommo/stream"))
        .header("X-Auth-Token", token_for(555))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let retail = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.kommo.client_secret = Secret::new(SECRET);
        c.kommo.base_url = ORIGIN.into();
    })
    .await;
    let (status, body) = call_with(
        &retail,
        Some(&token_for(USER)),
        json!({"phone": "+79991234567"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(retail.ami.actions("Originate").is_empty());
}

// --- the widget's script in a browser ---

/// The Kommo page: a stub of the widget API (an AMD `define`, `add_action`, `get_settings`,
/// `$authorizedAjax` adding the token, `APP.notifications`) that loads the widget's real
/// `script.js`, and a phone number that triggers the registered `phone` action when clicked.
fn stub_page(pbxgate: &str, token: &str) -> String {
    let stub = r##"<!doctype html>
<html><head><meta charset="utf-8"><title>Kommo (stub)</title></head>
<body>
<p>Contact: <a id="phone" href="#" data-phone="+7 999 123-45-67">+7 999 123-45-67</a></p>
<div id="notices"></div>
<script>
  window.__actions = {};
  function note(kind, m) {
    var d = document.createElement('div');
    d.className = 'notice ' + kind;
    d.textContent = m.text;
    document.getElementById('notices').appendChild(d);
  }
  window.APP = { notifications: {
    show_message: function (m) { note('ok', m); },
    show_message_error: function (m) { note('error', m); }
  } };
  window.define = function (deps, factory) { window.__factory = factory; };
</script>
<script src="/script.js"></script>
<script>
(function () {
  var PBXGATE = __PBXGATE__, TOKEN = __TOKEN__;
  var $ = function () { throw new Error('the stub has no jQuery'); };
  var Widget = window.__factory($);
  Widget.prototype.get_settings = function () { return { pbxgate_url: PBXGATE }; };
  Widget.prototype.get_install_status = function () { return 'installed'; };
  Widget.prototype.i18n = function () { return undefined; };
  Widget.prototype.add_action = function (type, cb) { window.__actions[type] = cb; };
  // Like Kommo's: jQuery.ajax with X-Auth-Token; data as a form; a jqXHR-like failure.
  Widget.prototype.$authorizedAjax = function (o) {
    var form = new URLSearchParams();
    Object.keys(o.data || {}).forEach(function (k) { form.append(k, o.data[k]); });
    var done = fetch(o.url, {
      method: o.method || o.type || 'GET',
      headers: { 'X-Auth-Token': TOKEN,
                 'Content-Type': 'application/x-www-form-urlencoded; charset=UTF-8' },
      body: form.toString()
    }).then(function (r) {
      return r.text().then(function (t) {
        var j = null;
        try { j = JSON.parse(t); } catch (e) {}
        if (!r.ok) { throw { status: r.status, responseText: t, responseJSON: j }; }
        return j;
      });
    });
    return { then: function (ok, fail) {
      done.then(ok, function (x) { fail(x && x.status !== undefined ? x : { status: 0 }); });
      return this;
    } };
  };
  var w = new Widget();
  w.callbacks.render();
  w.callbacks.init();
  w.callbacks.bind_actions();
  document.getElementById('phone').addEventListener('click', function (e) {
    e.preventDefault();
    window.__actions.phone({ value: this.getAttribute('data-phone') });
  });
  document.body.setAttribute('data-ready', '1');
})();
</script>
</body></html>"##;
    stub.replace("__PBXGATE__", &serde_json::to_string(pbxgate).unwrap())
        .replace("__TOKEN__", &serde_json::to_string(token).unwrap())
}

/// The Kommo account's pages on loopback: `/` (the stub page, once set) and `/script.js`.
struct AccountSite {
    origin: String,
    page: Arc<Mutex<String>>,
}

impl AccountSite {
    async fn start() -> AccountSite {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let page = Arc::new(Mutex::new(String::new()));
        let served = page.clone();
        let script = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/static/kommo-widget/script.js"
        ))
        .unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let page = served.lock().unwrap().clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head);
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (status, kind, body) = match path.as_str() {
                        "/" => ("200 OK", "text/html; charset=utf-8", page),
                        "/script.js" => ("200 OK", "text/javascript; charset=utf-8", script),
                        _ => ("404 Not Found", "text/plain", "no".to_string()),
                    };
                    let res = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(res.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        AccountSite { origin, page }
    }
}

#[tokio::test]
async fn the_widget_shows_a_ringing_call_and_a_click_calls_the_number() {
    let _one = BROWSER.lock().await;
    let site = AccountSite::start().await;
    let app = kommo_app(&site.origin).await;
    *site.page.lock().unwrap() = stub_page(&app.base, &sign(&claims(&site.origin, USER)));
    let b = Browser::start().await;
    b.client.goto(&format!("{}/", site.origin)).await.unwrap();
    b.wait_for("body[data-ready='1']").await;
    // The card's element exists once the first (empty) card arrived over the stream.
    b.wait_for("#pbxgate-call-card").await;

    ringing(&app, "b1", "+7 999 123-45-67", "101").await;
    let row = b
        .wait_for("#pbxgate-call-card .pbxgate-call[data-state='ringing']")
        .await;
    let text = row.text().await.unwrap();
    assert!(text.contains("+79991234567"), "{text}");
    assert!(text.contains("Ringing"), "{text}");
    let link = b
        .wait_for("#pbxgate-call-card .pbxgate-contact")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        link,
        format!(
            "{}/contacts/list/contacts/?term=%2B79991234567",
            site.origin
        )
    );

    // A click on the number: the authorised POST /kommo/call, an Originate from 101.
    b.wait_for("#phone").await.click().await.unwrap();
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    assert_eq!(o.get("Exten"), Some("+79991234567"));
    let notice = b
        .wait_for("#notices .notice.ok")
        .await
        .text()
        .await
        .unwrap();
    assert!(notice.contains("+7 999 123-45-67"), "{notice}");

    // Answered: the card says so.
    webhook(
        &app,
        json!({"call_id": "b1", "event": "answer", "extension": "101"}),
    )
    .await;
    b.wait_for("#pbxgate-call-card .pbxgate-call[data-state='talking']")
        .await;
    b.close().await;
    assert_eq!(app.ami.actions("Originate").len(), 1);
}
