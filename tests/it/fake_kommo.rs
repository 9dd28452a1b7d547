//! Self-tests of the fake Kommo account, with plain reqwest: it must refuse and answer like the
//! real account, or the scenario tests written against it prove nothing.

use std::net::TcpListener;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::support::fake_kommo::{
    ACCOUNT_ID, ANNA, BORIS, CLIENT_ID, CLIENT_SECRET, LONG_LIVED_TOKEN, REDIRECT_URI, SUBDOMAIN,
    VERA,
};
use crate::support::FakeKommo;

struct Answer {
    status: u16,
    content_type: String,
    text: String,
    json: Value,
}

async fn send(r: reqwest::RequestBuilder) -> Answer {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        text,
        json,
    }
}

async fn get(k: &FakeKommo, path: &str, token: &str) -> Answer {
    send(
        reqwest::Client::new()
            .get(format!("{}{path}", k.url))
            .bearer_auth(token),
    )
    .await
}

async fn post(k: &FakeKommo, path: &str, body: &Value) -> Answer {
    post_as(k, path, body, LONG_LIVED_TOKEN).await
}

async fn post_as(k: &FakeKommo, path: &str, body: &Value, token: &str) -> Answer {
    send(
        reqwest::Client::new()
            .post(format!("{}{path}", k.url))
            .bearer_auth(token)
            .json(body),
    )
    .await
}

async fn patch(k: &FakeKommo, path: &str, body: &Value) -> Answer {
    send(
        reqwest::Client::new()
            .patch(format!("{}{path}", k.url))
            .bearer_auth(LONG_LIVED_TOKEN)
            .json(body),
    )
    .await
}

fn call(phone: &str) -> Value {
    json!({"direction": "inbound", "uniq": "pbx-1", "duration": 42, "source": "pbxgate",
           "phone": phone, "call_status": 4, "call_result": "Answered",
           "responsible_user_id": BORIS, "created_by": BORIS, "created_at": 1_795_255_200,
           "request_id": "r1"})
}

/// The errors of the first item of a validation answer, as (code, path).
fn errors(a: &Answer) -> Vec<(String, String)> {
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json["detail"], "Request validation failed", "{}", a.text);
    assert!(a.content_type.starts_with("application/problem+json"));
    a.json["validation-errors"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn bearer_auth_is_enforced() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let http = reqwest::Client::new();
    let none = send(http.get(format!("{}/api/v4/account", k.url))).await;
    assert_eq!(none.status, 401, "{}", none.text);
    assert!(none.content_type.starts_with("application/problem+json"));
    assert_eq!(none.json["status"], 401);
    let wrong = get(&k, "/api/v4/account", "not-a-token").await;
    assert_eq!(wrong.status, 401);
    // A client secret is not a token either.
    assert_eq!(get(&k, "/api/v4/account", CLIENT_SECRET).await.status, 401);

    let ok = get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(ok.content_type.starts_with("application/hal+json"));
    assert_eq!(ok.json["id"], ACCOUNT_ID);
    assert_eq!(ok.json["subdomain"], SUBDOMAIN);
    assert_eq!(ok.json["current_user_id"], ANNA);

    let users = get(&k, "/api/v4/users?limit=250", LONG_LIVED_TOKEN).await;
    assert_eq!(users.status, 200, "{}", users.text);
    let list = users.json["_embedded"]["users"].as_array().unwrap();
    let ids: Vec<i64> = list.iter().map(|u| u["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![ANNA, BORIS, VERA]);
    assert_eq!(list[0]["name"], "Anna");
    assert_eq!(list[0]["rights"]["is_admin"], true);
    assert_eq!(list[1]["rights"]["is_admin"], false);
    assert_eq!(
        get(&k, "/api/v4/users?limit=251", LONG_LIVED_TOKEN)
            .await
            .status,
        400
    );

    k.set_long_lived_revoked(true);
    assert_eq!(
        get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await.status,
        401
    );
    let reqs = k.requests_to("/api/v4/account");
    assert_eq!(reqs.len(), 5);
    assert_eq!(reqs[0].auth, None);
    assert_eq!(reqs[3].auth.as_deref(), Some(LONG_LIVED_TOKEN));
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![401, 401, 401, 200, 401]
    );
}

#[tokio::test]
async fn a_call_for_an_unknown_number_is_entity_not_found() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    k.add_contact("Somebody", "+7 999 000-00-00", BORIS);
    let a = post(&k, "/api/v4/calls", &json!([call("+7 999 123-45-67")])).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json["_total_items"], 0);
    assert_eq!(a.json["errors"][0]["title"], "Entity not found");
    assert_eq!(a.json["errors"][0]["request_id"], "r1");
    assert!(a.json.get("validation-errors").is_none());
    assert!(k.calls().is_empty());
}

#[tokio::test]
async fn nulls_unknown_fields_and_bad_values_are_refused() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let c = k.add_contact("Ivan", "+79991234567", BORIS);
    k.add_lead_for(c, BORIS);

    let mut item = call("+79991234567");
    item["link"] = Value::Null;
    item["call_result"] = Value::Null;
    let a = post(&k, "/api/v4/calls", &json!([item])).await;
    let errs = errors(&a);
    assert!(
        errs.contains(&("NotNullable".into(), "link".into())),
        "{errs:?}"
    );
    assert!(
        errs.contains(&("NotNullable".into(), "call_result".into())),
        "{errs:?}"
    );
    assert_eq!(a.json["validation-errors"][0]["request_id"], "r1");

    let mut item = call("+79991234567");
    item["colour"] = json!("red");
    item["direction"] = json!("in");
    item["call_status"] = json!(8);
    item["duration"] = json!("42");
    item["responsible_user_id"] = json!(1);
    item.as_object_mut().unwrap().remove("source");
    let errs = errors(&post(&k, "/api/v4/calls", &json!([item])).await);
    for want in [
        ("FieldExtra", "colour"),
        ("NotSupportedChoice", "direction"),
        ("NotSupportedChoice", "call_status"),
        ("InvalidType", "duration"),
        ("NotSupportedChoice", "responsible_user_id"),
        ("FieldMissing", "source"),
    ] {
        assert!(
            errs.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {errs:?}"
        );
    }
    // Not an array, an empty array: refused whole.
    let a = post(&k, "/api/v4/calls", &call("+79991234567")).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.json["validation-errors"].is_array());
    assert_eq!(post(&k, "/api/v4/calls", &json!([])).await.status, 400);
    // Not JSON.
    let a = send(
        reqwest::Client::new()
            .post(format!("{}/api/v4/calls", k.url))
            .bearer_auth(LONG_LIVED_TOKEN)
            .form(&[("phone", "1")]),
    )
    .await;
    assert_eq!(a.status, 400);
    // A batch with one bad item creates nothing.
    let mut bad = call("+79991234567");
    bad["link"] = Value::Null;
    bad["request_id"] = json!("r2");
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567"), bad])).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json["validation-errors"][0]["request_id"], "r2");
    assert!(k.calls().is_empty());
    // Calls cannot be read.
    assert_eq!(get(&k, "/api/v4/calls", LONG_LIVED_TOKEN).await.status, 405);
}

#[tokio::test]
async fn a_known_number_attaches_to_its_lead_and_duplicates_are_kept() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let ivan = k.add_contact("Ivan", "+7 (999) 123-45-67", BORIS);
    let lead = k.add_lead_for(ivan, BORIS);
    // Another number whose contact has two active leads: the call goes to the contact.
    let olga = k.add_contact("Olga", "+7 999 765-43-21", VERA);
    k.add_lead_for(olga, VERA);
    k.add_lead_for(olga, VERA);
    // A company's number.
    let acme = k.add_company("Acme", "+1 212 555 0100", ANNA);

    // Another prefix, same last 10 digits.
    let a = post(&k, "/api/v4/calls", &json!([call("89991234567")])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let got = &a.json["_embedded"]["calls"][0];
    assert_eq!(got["entity_type"], "leads");
    assert_eq!(got["entity_id"], lead);
    assert_eq!(got["request_id"], "r1");
    assert!(got["id"].is_i64());
    assert_eq!(a.json["_total_items"], 1);

    let a = post(&k, "/api/v4/calls", &json!([call("+79997654321")])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_type"], "contacts");
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_id"], olga);
    let a = post(&k, "/api/v4/calls", &json!([call("12125550100")])).await;
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_type"], "companies");
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_id"], acme);

    // The same call again: Kommo does not dedupe.
    let a = post(&k, "/api/v4/calls", &json!([call("89991234567")])).await;
    assert_eq!(a.status, 200);
    let calls = k.calls();
    assert_eq!(calls.len(), 4);
    let ivans: Vec<&Value> = calls.iter().filter(|c| c["entity_id"] == lead).collect();
    assert_eq!(ivans.len(), 2);
    assert_eq!(ivans[0]["uniq"], ivans[1]["uniq"]);
    assert_eq!(ivans[0]["phone"], "89991234567");
    assert_eq!(ivans[0]["created_at"], 1_795_255_200);

    // Once the lead is closed, the call goes to the contact.
    k.close_lead(lead, true);
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567")])).await;
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_type"], "contacts");
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_id"], ivan);

    // A mixed batch: the known one is created, the answer is still a 400.
    let mut unknown = call("+44 20 7946 0000");
    unknown["request_id"] = json!("r2");
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567"), unknown])).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json["_total_items"], 1);
    assert_eq!(a.json["errors"][0]["request_id"], "r2");
    assert_eq!(k.calls().len(), 6);
}

#[tokio::test]
async fn contact_search_is_a_raw_substring_search_and_empty_is_204() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let ivan = k.add_contact("Ivan", "+7 (999) 123-45-67", BORIS);
    let lead = k.add_lead_for(ivan, BORIS);
    k.add_contact("Olga", "+79997654321", VERA);

    let none = get(&k, "/api/v4/contacts?query=5550000", LONG_LIVED_TOKEN).await;
    assert_eq!(none.status, 204);
    assert!(none.text.is_empty());
    // Stored with punctuation: the bare digits are not found, the stored text is.
    assert_eq!(
        get(&k, "/api/v4/contacts?query=79991234567", LONG_LIVED_TOKEN)
            .await
            .status,
        204
    );
    let a = get(
        &k,
        "/api/v4/contacts?query=123-45-67&with=leads",
        LONG_LIVED_TOKEN,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let c = &a.json["_embedded"]["contacts"][0];
    assert_eq!(c["id"], ivan);
    assert_eq!(c["responsible_user_id"], BORIS);
    assert_eq!(c["custom_fields_values"][0]["field_code"], "PHONE");
    assert_eq!(
        c["custom_fields_values"][0]["values"][0]["enum_code"],
        "WORK"
    );
    assert_eq!(c["_embedded"]["leads"][0]["id"], lead);
    assert_eq!(a.json["_embedded"]["contacts"].as_array().unwrap().len(), 1);

    // Paging.
    let p1 = get(&k, "/api/v4/contacts?limit=1", LONG_LIVED_TOKEN).await;
    assert_eq!(
        p1.json["_embedded"]["contacts"].as_array().unwrap().len(),
        1
    );
    let next = p1.json["_links"]["next"]["href"].as_str().unwrap();
    let p2 = send(
        reqwest::Client::new()
            .get(next)
            .bearer_auth(LONG_LIVED_TOKEN),
    )
    .await;
    assert_eq!(p2.json["_embedded"]["contacts"][0]["name"], "Olga");
    assert!(p2.json["_links"].get("next").is_none());
    let p3 = get(&k, "/api/v4/contacts?limit=1&page=3", LONG_LIVED_TOKEN).await;
    assert_eq!(p3.status, 204);

    let one = get(&k, &format!("/api/v4/contacts/{ivan}"), LONG_LIVED_TOKEN).await;
    assert_eq!(one.json["name"], "Ivan");
    assert_eq!(
        get(&k, "/api/v4/contacts/123", LONG_LIVED_TOKEN)
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn oauth_codes_and_refresh_tokens_work_once() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let http = reqwest::Client::new();
    let token_url = format!("{}/oauth2/access_token", k.url);
    let grant = |extra: Value| {
        let mut b = json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                           "redirect_uri": REDIRECT_URI});
        for (key, v) in extra.as_object().unwrap() {
            b[key] = v.clone();
        }
        b
    };
    let code = k.issue_code();
    let a = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "authorization_code", "code": code}),
    )))
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["token_type"], "Bearer");
    assert_eq!(a.json["expires_in"], 86400);
    assert!(a.json["server_time"].is_i64());
    let access1 = a.json["access_token"].as_str().unwrap().to_string();
    let refresh1 = a.json["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(get(&k, "/api/v4/account", &access1).await.status, 200);

    // The code is single-use; a wrong secret is refused.
    let again = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "authorization_code", "code": code}),
    )))
    .await;
    assert_eq!(again.status, 400, "{}", again.text);
    let mut bad = grant(json!({"grant_type": "refresh_token", "refresh_token": refresh1}));
    bad["client_secret"] = json!("wrong");
    assert_eq!(send(http.post(&token_url).json(&bad)).await.status, 401);

    k.set_access_ttl(Duration::from_secs(5));
    let r = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "refresh_token", "refresh_token": refresh1}),
    )))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["expires_in"], 5);
    let access2 = r.json["access_token"].as_str().unwrap().to_string();
    let refresh2 = r.json["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(access2, access1);
    assert_ne!(refresh2, refresh1);
    assert_eq!(k.refreshes(), 1);
    // The old access token went with its refresh token.
    assert_eq!(get(&k, "/api/v4/account", &access1).await.status, 401);
    assert_eq!(get(&k, "/api/v4/account", &access2).await.status, 200);

    // The used refresh token again: revoked.
    let reuse = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "refresh_token", "refresh_token": refresh1}),
    )))
    .await;
    assert_eq!(reuse.status, 401, "{}", reuse.text);
    assert_eq!(reuse.json["hint"], "Token has been revoked");
    assert!(reuse.content_type.starts_with("application/problem+json"));
    assert_eq!(k.refreshes(), 1);

    // Expiry: 401 on API calls; the current refresh token still works.
    k.expire_access_tokens();
    let expired = get(&k, "/api/v4/account", &access2).await;
    assert_eq!(expired.status, 401);
    assert!(expired.content_type.starts_with("application/problem+json"));
    let form = send(http.post(&token_url).form(&[
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("redirect_uri", REDIRECT_URI),
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh2.as_str()),
    ]))
    .await;
    assert_eq!(form.status, 200, "{}", form.text);
    assert_eq!(k.refreshes(), 2);

    // The long-lived token is not refreshable: it is no refresh token.
    let llt = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "refresh_token", "refresh_token": LONG_LIVED_TOKEN}),
    )))
    .await;
    assert_eq!(llt.status, 401);

    // A non-admin's token cannot list users.
    let code = k.issue_code_for(BORIS);
    let b = send(http.post(&token_url).json(&grant(
        json!({"grant_type": "authorization_code", "code": code}),
    )))
    .await;
    let boris = b.json["access_token"].as_str().unwrap().to_string();
    assert_eq!(get(&k, "/api/v4/users", &boris).await.status, 403);
    assert_eq!(
        get(&k, "/api/v4/account", &boris).await.json["current_user_id"],
        BORIS
    );
}

#[tokio::test]
async fn more_than_seven_requests_in_a_second_get_429() {
    let k = FakeKommo::start().await;
    let http = reqwest::Client::new();
    let account = format!("{}/api/v4/account", k.url);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = http
            .get(&account)
            .bearer_auth(LONG_LIVED_TOKEN)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 200, 200, 429]);
    assert_eq!(k.rejected(), 1);
    let first = k.requests()[0].at;
    // The window slides: a second after the first request, one more is admitted.
    let wait = Duration::from_millis(1050).saturating_sub(first.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(
        get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await.status,
        200
    );

    k.set_rate_limit(1);
    k.set_rate_limit_html(true);
    assert_eq!(
        get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await.status,
        200
    );
    let html = get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await;
    assert_eq!(html.status, 429);
    assert!(
        html.content_type.starts_with("text/html"),
        "{}",
        html.content_type
    );
    assert_eq!(k.rejected(), 2);
}

#[tokio::test]
async fn blocked_unpaid_outage_and_scripted_faults() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    k.set_blocked(true);
    let a = get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await;
    assert_eq!(a.status, 403);
    assert!(a.content_type.starts_with("text/html"));
    assert!(a.text.contains("403 Forbidden") && a.text.contains("nginx"));
    assert!(a.json.is_null());
    k.set_blocked(false);

    k.set_unpaid(true);
    let a = get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await;
    assert_eq!(a.status, 402);
    assert!(a.content_type.starts_with("application/problem+json"));
    k.set_unpaid(false);

    k.set_outage(true);
    assert_eq!(
        get(&k, "/api/v4/account", LONG_LIVED_TOKEN).await.status,
        503
    );
    k.set_outage(false);

    let c = k.add_contact("Ivan", "+79991234567", BORIS);
    k.add_lead_for(c, BORIS);
    k.fail_next(
        "/api/v4/calls",
        504,
        json!({"title": "Gateway Timeout", "status": 504}),
    );
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567")])).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.json["title"], "Gateway Timeout");
    assert!(k.calls().is_empty());
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567")])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(k.calls().len(), 1);
}

fn verify_hs256(token: &str, secret: &str) -> Option<Value> {
    let (input, sig) = token.rsplit_once('.')?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    mac.verify_slice(&sig).ok()?;
    let (header, payload) = input.split_once('.')?;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .ok()?,
    )
    .ok()?;
    assert_eq!(header["alg"], "HS256");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?,
    )
    .ok()
}

#[tokio::test]
async fn widget_tokens_verify_with_the_client_secret() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let t = k.widget_token(BORIS);
    let claims = verify_hs256(&t, CLIENT_SECRET).expect("verifies with the client secret");
    assert_eq!(claims["iss"], k.url.as_str());
    assert_eq!(claims["aud"], "https://pbx.example.com");
    assert_eq!(claims["account_id"], ACCOUNT_ID);
    assert_eq!(claims["subdomain"], SUBDOMAIN);
    assert_eq!(claims["user_id"], BORIS);
    assert_eq!(claims["client_uuid"], CLIENT_ID);
    assert_eq!(claims["is_admin"], false);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!((nbf, exp - iat), (iat, 1800));
    assert_eq!(
        verify_hs256(&k.widget_token(ANNA), CLIENT_SECRET).unwrap()["is_admin"],
        true
    );
    assert_ne!(
        verify_hs256(&k.widget_token(BORIS), CLIENT_SECRET).unwrap()["jti"],
        claims["jti"]
    );

    let forged = k.widget_token_with(BORIS, |_| {}, "another-secret");
    assert!(verify_hs256(&forged, CLIENT_SECRET).is_none());
    assert!(verify_hs256(&forged, "another-secret").is_some());
    let expired = k.widget_token_with(
        VERA,
        |c| {
            c.insert("exp".into(), json!(1_000_000_000));
            c.insert("account_id".into(), json!(1));
        },
        CLIENT_SECRET,
    );
    let c = verify_hs256(&expired, CLIENT_SECRET).unwrap();
    assert_eq!(
        (c["exp"].as_i64(), c["account_id"].as_i64()),
        (Some(1_000_000_000), Some(1))
    );
}

#[tokio::test]
async fn unsorted_sip_creates_a_hidden_lead_and_contact_until_accepted() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    let item = json!({
        "source_uid": "pbx-7", "source_name": "pbxgate", "created_at": 1_795_255_200,
        "metadata": {"uniq": "pbx-7", "from": "+79995550011", "phone": "101",
                     "called_at": 1_795_255_200, "duration": 0, "service_code": "pbxgate",
                     "is_call_event_needed": true},
        "_embedded": {"leads": [{"name": "+79995550011 - missed incoming call",
                                 "responsible_user_id": BORIS}],
                      "contacts": [{"name": "Contact +79995550011",
                                    "custom_fields_values": [{"field_code": "PHONE",
                                        "values": [{"value": "+79995550011", "enum_code": "WORK"}]}]}]},
        "request_id": "0",
    });
    let mut null_link = item.clone();
    null_link["metadata"]["link"] = Value::Null;
    let errs = errors(&post(&k, "/api/v4/leads/unsorted/sip", &json!([null_link])).await);
    assert_eq!(
        errs,
        vec![("NotNullable".to_string(), "metadata.link".to_string())]
    );
    let mut no_uid = item.clone();
    no_uid.as_object_mut().unwrap().remove("source_uid");
    let errs = errors(&post(&k, "/api/v4/leads/unsorted/sip", &json!([no_uid])).await);
    assert_eq!(
        errs,
        vec![("FieldMissing".to_string(), "source_uid".to_string())]
    );

    let a = post(&k, "/api/v4/leads/unsorted/sip", &json!([item])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let u = &a.json["_embedded"]["unsorted"][0];
    let uid = u["uid"].as_str().unwrap().to_string();
    assert_eq!(u["request_id"], "0");
    let lead = u["_embedded"]["leads"][0]["id"].as_i64().unwrap();
    let contact = u["_embedded"]["contacts"][0]["id"].as_i64().unwrap();
    assert_eq!(k.unsorted()[0]["uid"], uid.as_str());
    assert_eq!(k.unsorted()[0]["metadata"]["from"], "+79995550011");

    // Hidden until accepted: no search hit, a call for the number is not attached.
    assert_eq!(
        get(&k, "/api/v4/contacts?query=5550011", LONG_LIVED_TOKEN)
            .await
            .status,
        204
    );
    assert_eq!(
        post(&k, "/api/v4/calls", &json!([call("+79995550011")]))
            .await
            .status,
        400
    );
    let a = post(
        &k,
        &format!("/api/v4/leads/unsorted/{uid}/accept"),
        &json!({"user_id": VERA}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let found = get(
        &k,
        "/api/v4/contacts?query=5550011&with=leads",
        LONG_LIVED_TOKEN,
    )
    .await;
    assert_eq!(found.json["_embedded"]["contacts"][0]["id"], contact);
    let l = k.lead(lead).unwrap();
    assert_eq!(l["responsible_user_id"], VERA);
    assert_eq!(l["name"], "+79995550011 - missed incoming call");
    let a = post(&k, "/api/v4/calls", &json!([call("+79995550011")])).await;
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_id"], lead);
    // Accepted once.
    let again = post(
        &k,
        &format!("/api/v4/leads/unsorted/{uid}/accept"),
        &json!({}),
    )
    .await;
    assert_eq!(again.status, 400);
}

#[tokio::test]
async fn events_contacts_leads_tasks_and_notes() {
    let k = FakeKommo::start().await;
    k.set_rate_limit(1000);
    // /api/v2/events
    let ev =
        json!({"add": [{"type": "phone_call", "phone_number": "+79991234567", "users": [BORIS]}]});
    let a = post(&k, "/api/v2/events", &ev).await;
    assert_eq!((a.status, a.json.clone()), (202, json!({})), "{}", a.text);
    assert_eq!(k.events(), vec![ev["add"][0].clone()]);
    let bad = json!({"add": [{"type": "call", "phone_number": "+7999", "users": [1]}]});
    let errs = errors(&post(&k, "/api/v2/events", &bad).await);
    assert!(
        errs.contains(&("NotSupportedChoice".into(), "add.0.type".into())),
        "{errs:?}"
    );
    assert!(
        errs.contains(&("NotSupportedChoice".into(), "add.0.users.0".into())),
        "{errs:?}"
    );
    assert_eq!(k.events().len(), 1);

    // A contact, then a lead with it, over the API.
    let a = post(
        &k,
        "/api/v4/contacts",
        &json!([{"name": "Contact +79991234567",
        "responsible_user_id": BORIS,
        "custom_fields_values": [{"field_code": "PHONE",
            "values": [{"value": "+79991234567", "enum_code": "WORK"}]}]}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let contact = a.json["_embedded"]["contacts"][0]["id"].as_i64().unwrap();
    assert_eq!(a.json["_embedded"]["contacts"][0]["request_id"], "0");
    let errs = errors(
        &post(
            &k,
            "/api/v4/contacts",
            &json!([{"name": "X",
        "custom_fields_values": [{"field_code": "FAX", "values": [{"value": "1"}]}]}]),
        )
        .await,
    );
    assert_eq!(
        errs,
        vec![(
            "NotSupportedChoice".to_string(),
            "custom_fields_values.0.field_code".to_string()
        )]
    );
    let a = post(
        &k,
        "/api/v4/leads",
        &json!([{"name": "Deal", "responsible_user_id": BORIS,
        "_embedded": {"contacts": [{"id": contact}]}}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let lead = a.json["_embedded"]["leads"][0]["id"].as_i64().unwrap();
    let a = post(&k, "/api/v4/calls", &json!([call("+79991234567")])).await;
    assert_eq!(a.json["_embedded"]["calls"][0]["entity_id"], lead);

    // PATCH: the responsible user changes.
    let a = patch(
        &k,
        "/api/v4/contacts",
        &json!([{"id": contact, "responsible_user_id": VERA}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(k.contact(contact).unwrap()["responsible_user_id"], VERA);
    let a = patch(
        &k,
        "/api/v4/leads",
        &json!([{"id": lead, "responsible_user_id": VERA}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(k.lead(lead).unwrap()["responsible_user_id"], VERA);
    assert_eq!(
        patch(&k, "/api/v4/leads", &json!([{"id": 1, "name": "x"}]))
            .await
            .status,
        400
    );

    // Tasks.
    let errs = errors(
        &post(
            &k,
            "/api/v4/tasks",
            &json!([{"text": "Call back",
        "task_type_id": 3, "entity_id": lead}]),
        )
        .await,
    );
    for want in [
        ("FieldMissing", "complete_till"),
        ("NotSupportedChoice", "task_type_id"),
        ("FieldMissing", "entity_type"),
    ] {
        assert!(
            errs.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {errs:?}"
        );
    }
    let a = post(
        &k,
        "/api/v4/tasks",
        &json!([{"text": "Missed call from +79991234567",
        "complete_till": 1_795_258_800, "task_type_id": 1, "entity_id": lead,
        "entity_type": "leads", "responsible_user_id": VERA, "request_id": "0"}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let task = a.json["_embedded"]["tasks"][0]["id"].as_i64().unwrap();
    assert_eq!(k.tasks()[0]["id"], task);
    assert_eq!(k.tasks()[0]["text"], "Missed call from +79991234567");
    let a = patch(
        &k,
        "/api/v4/tasks",
        &json!([{"id": task, "is_completed": true,
        "result": {"text": "Called back"}}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(k.tasks()[0]["is_completed"], true);
    let open = get(&k, "/api/v4/tasks?filter[is_completed]=0", LONG_LIVED_TOKEN).await;
    assert_eq!(open.status, 204);

    // Call notes: nulls refused as in GH#383.
    let mut errs = errors(
        &post(
            &k,
            "/api/v4/contacts/notes",
            &json!([{"entity_id": contact,
        "note_type": "call_out", "params": {"uniq": "pbx-9", "duration": 160, "source": "pbxgate",
        "link": null, "phone": "+79991234567", "call_status": null}}]),
        )
        .await,
    );
    errs.sort();
    assert_eq!(
        errs,
        vec![
            ("NotNullable".to_string(), "params.call_status".to_string()),
            ("NotNullable".to_string(), "params.link".to_string())
        ]
    );
    let a = post(
        &k,
        "/api/v4/contacts/notes",
        &json!([{"entity_id": contact,
        "note_type": "call_in", "params": {"uniq": "pbx-9", "duration": 160, "source": "pbxgate",
        "phone": "+79991234567", "call_status": 4}}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let note = a.json["_embedded"]["notes"][0]["id"].as_i64().unwrap();
    let a = patch(
        &k,
        "/api/v4/contacts/notes",
        &json!([{"id": note,
        "params": {"link": "https://pbx.example.com/r/1.mp3"}}]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let n = &k.notes()[0];
    assert_eq!(
        (n["entity_type"].as_str(), n["entity_id"].as_i64()),
        (Some("contacts"), Some(contact))
    );
    assert_eq!(n["params"]["link"], "https://pbx.example.com/r/1.mp3");
    assert_eq!(n["params"]["uniq"], "pbx-9");
    assert_eq!(
        post(
            &k,
            "/api/v4/leads/notes",
            &json!([{"entity_id": 5, "note_type": "common",
        "params": {"text": "hi"}}])
        )
        .await
        .status,
        400
    );
}

#[tokio::test]
async fn fetch_link_gets_a_recording_like_a_browser() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/r/ok.mp3",
                web::get().to(|req: actix_web::HttpRequest| async move {
                    // A browser playing a link sends no credentials.
                    if req.headers().contains_key("authorization") {
                        return HttpResponse::BadRequest().finish();
                    }
                    HttpResponse::Ok()
                        .content_type("audio/mpeg")
                        .body(vec![0xffu8; 1234])
                }),
            )
            .route(
                "/r/moved",
                web::get().to(|| async {
                    HttpResponse::Found()
                        .append_header(("location", "/r/ok.mp3"))
                        .finish()
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    tokio::spawn(server);

    let k = FakeKommo::start().await;
    assert_eq!(
        k.fetch_link(&format!("http://{addr}/r/ok.mp3")).await,
        (200, "audio/mpeg".to_string(), 1234)
    );
    assert_eq!(
        k.fetch_link(&format!("http://{addr}/r/moved")).await,
        (200, "audio/mpeg".to_string(), 1234)
    );
    assert_eq!(k.fetch_link(&format!("http://{addr}/r/none")).await.0, 404);
    handle.stop(false).await;
    // Nothing was sent to the account itself.
    assert!(k.requests().is_empty());
}
