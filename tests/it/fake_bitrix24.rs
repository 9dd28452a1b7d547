//! Self-tests of the fake Bitrix24 portal, with plain reqwest: it must refuse and answer like the
//! real portal, or the scenario tests written against it prove nothing.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::fake_bitrix24::{
    self, php_parse_query, CALL_NOT_FOUND, CLIENT_ID, CLIENT_SECRET, MEMBER_ID, NOT_IN_STATISTIC,
    WEBHOOK_SECRET,
};
use crate::support::FakeBitrix24;

async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// POST form to a webhook method.
async fn form(b24: &FakeBitrix24, method: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    send(
        reqwest::Client::new()
            .post(format!("{}{method}", b24.webhook_url()))
            .form(pairs),
    )
    .await
}

async fn register(b24: &FakeBitrix24, extra: Value) -> (u16, Value) {
    let mut p = json!({"USER_ID": 11, "PHONE_NUMBER": "+7 (999) 123-45-67", "TYPE": 2,
                       "CALL_START_DATE": "2026-03-07T10:20:30+03:00"});
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    b24.call_webhook("telephony.externalcall.register", &p)
        .await
}

async fn registered(b24: &FakeBitrix24, extra: Value) -> String {
    let (status, body) = register(b24, extra).await;
    assert_eq!(status, 200, "{body}");
    body["result"]["CALL_ID"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn webhook_auth_is_enforced_and_the_envelope_is_real() {
    let b24 = FakeBitrix24::start().await;
    let http = reqwest::Client::new();
    for bad in [
        format!("{}/rest/1/wrongsecret/scope", b24.url),
        format!("{}/rest/2/{WEBHOOK_SECRET}/scope", b24.url),
    ] {
        let (status, body) = send(http.get(&bad)).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"], "NO_AUTH_FOUND");
    }
    // .json suffix, trailing slash, any case: the same method.
    for m in ["scope", "scope.json", "scope/", "SCOPE"] {
        let (status, body) = send(http.get(format!("{}{m}", b24.webhook_url()))).await;
        assert_eq!(status, 200, "{m}: {body}");
        assert_eq!(body["result"], json!(["telephony", "crm", "user"]));
        let t = &body["time"];
        for k in [
            "start",
            "finish",
            "duration",
            "processing",
            "operating_reset_at",
        ] {
            assert!(t[k].is_number(), "{k}: {t}");
        }
        assert!(t["date_start"].as_str().unwrap().ends_with("+03:00"), "{t}");
        assert!(body.get("total").is_none());
    }
    let (status, body) = send(http.get(format!("{}no.such.method", b24.webhook_url()))).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "ERROR_METHOD_NOT_FOUND");
    // An OAuth-style call without a token.
    let (status, body) = send(http.get(format!("{}/rest/scope", b24.url))).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "NO_AUTH_FOUND");
    let reqs = b24.requests();
    assert_eq!(reqs.len(), 8);
    assert_eq!(reqs[0].status, 401);
    assert_eq!(reqs[2].method, "scope");
    assert_eq!(reqs[7].auth, "none");
}

#[tokio::test]
async fn telephony_validation_errors_have_an_empty_code_and_status_400() {
    let b24 = FakeBitrix24::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"USER_ID": "", "USER_PHONE_INNER": ""}),
            "USER_ID or USER_PHONE_INNER should be set",
        ),
        (json!({"TYPE": 9}), "Unknown TYPE"),
        (
            json!({"CALL_START_DATE": "yesterday at noon"}),
            "CALL_START_DATE should be in the ISO-8601 format",
        ),
        (
            json!({"PHONE_NUMBER": "anonymous"}),
            "Unsupported phone number format",
        ),
        (json!({"USER_ID": 14}), "User is not found or is not active"),
        (
            json!({"USER_ID": 999}),
            "User is not found or is not active",
        ),
    ];
    for (extra, text) in cases {
        let mut p = json!({"PHONE_NUMBER": "+79991234567", "TYPE": 2, "USER_ID": 11});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        let (status, body) = b24
            .call_webhook("telephony.externalcall.register", &p)
            .await;
        assert_eq!(status, 400, "{p}: {body}");
        assert_eq!(body["error"], "", "{body}");
        assert_eq!(body["error_description"], text, "{p}");
    }
    // By extension (form, as PHP clients send it): the dismissed user's extension is refused.
    let (status, body) = form(
        &b24,
        "telephony.externalcall.register",
        &[
            ("USER_PHONE_INNER", "104"),
            ("PHONE_NUMBER", "+79991234567"),
            ("TYPE", "2"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("User is not found or is not active"))
    );
    let (status, body) = form(
        &b24,
        "telephony.externalcall.register",
        &[
            ("USER_PHONE_INNER", "102"),
            ("PHONE_NUMBER", "8 (999) 000-11-22 ext"),
            ("TYPE", "1"),
            ("SHOW", "0"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let call = b24
        .call(body["result"]["CALL_ID"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        (call.user_id, call.phone.as_str(), call.show),
        (12, "89990001122", false)
    );
    assert!(call.visible.is_empty());
    assert!(body["result"]["CALL_ID"]
        .as_str()
        .unwrap()
        .starts_with("externalCall."));
    assert_eq!(body["result"]["CRM_ENTITY_TYPE"], "");
    // A finish with a numeric CALL_ID.
    let (status, body) = b24
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": 5, "USER_ID": 11}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
}

#[tokio::test]
async fn dates_without_an_offset_are_accepted_but_flagged() {
    let b24 = FakeBitrix24::start().await;
    let with = registered(&b24, json!({"EXTERNAL_CALL_ID": "a"})).await;
    let without = registered(
        &b24,
        json!({"EXTERNAL_CALL_ID": "b", "CALL_START_DATE": "2026-03-07 10:20:30"}),
    )
    .await;
    let (with, without) = (b24.call(&with).unwrap(), b24.call(&without).unwrap());
    assert!(!with.start_offset_missing);
    assert!(without.start_offset_missing);
    // Read in the portal's zone (UTC+3): the same instant.
    assert_eq!(with.start_unix, without.start_unix);
    assert_eq!(with.start, "2026-03-07T10:20:30+03:00");
}

#[tokio::test]
async fn the_bucket_answers_503_after_its_capacity() {
    let b24 = FakeBitrix24::start().await;
    b24.set_bucket(3, 0.0);
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let (status, _) = send(http.get(format!("{}server.time", b24.webhook_url()))).await;
        assert_eq!(status, 200);
    }
    let (status, body) = send(http.get(format!("{}server.time", b24.webhook_url()))).await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
    );
    assert_eq!(b24.rejected(), 1);
    // It drains (4 per second: 1 in 250 ms).
    b24.set_bucket(1, 4.0);
    assert_eq!(
        send(http.get(format!("{}server.time", b24.webhook_url())))
            .await
            .0,
        200
    );
    assert_eq!(
        send(http.get(format!("{}server.time", b24.webhook_url())))
            .await
            .0,
        503
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send(http.get(format!("{}server.time", b24.webhook_url())))
            .await
            .0,
        200
    );
    assert_eq!(b24.rejected(), 2);
}

#[tokio::test]
async fn register_dedups_on_the_external_call_id() {
    let b24 = FakeBitrix24::start().await;
    let a1 = registered(&b24, json!({"EXTERNAL_CALL_ID": "linked-1"})).await;
    let a2 = registered(&b24, json!({"EXTERNAL_CALL_ID": "linked-1"})).await;
    let b = registered(&b24, json!({"EXTERNAL_CALL_ID": "linked-2"})).await;
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    assert_eq!(b24.calls().len(), 2);
    assert_eq!(b24.call(&a1).unwrap().dedup_hits, 1);
    // Another type or user is another call.
    let other_type = registered(&b24, json!({"EXTERNAL_CALL_ID": "linked-1", "TYPE": 3})).await;
    assert_ne!(other_type, a1);
    // A finished call is no dedup target.
    let (status, _) = b24
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": a1, "USER_ID": 11, "DURATION": 3}),
        )
        .await;
    assert_eq!(status, 200);
    let again = registered(&b24, json!({"EXTERNAL_CALL_ID": "linked-1"})).await;
    assert_ne!(again, a1);
}

#[tokio::test]
async fn finish_twice_fails_the_second_time_and_hides_only_the_finishers_card() {
    let b24 = FakeBitrix24::start().await;
    let id = registered(&b24, json!({})).await;
    let (status, body) = form(
        &b24,
        "telephony.externalcall.show",
        &[("CALL_ID", &id), ("USER_ID[]", "12"), ("USER_ID[]", "13")],
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    assert_eq!(
        b24.call(&id)
            .unwrap()
            .visible
            .into_iter()
            .collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    let (status, body) = form(
        &b24,
        "telephony.externalcall.hide",
        &[("CALL_ID", &id), ("USER_ID", "13")],
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));

    let (status, body) = b24
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": id, "USER_PHONE_INNER": "101"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let row = &body["result"];
    assert_eq!(row["CALL_FAILED_CODE"], "304");
    assert_eq!(row["CALL_DURATION"], 0);
    assert_eq!(row["CALL_STATUS"], 0);
    assert_eq!(row["PHONE_NUMBER"], "+79991234567");
    // User 12's card stays up: nothing can hide it after the finish.
    assert_eq!(b24.open_cards(), vec![(id.clone(), 12)]);
    let (_, body) = form(
        &b24,
        "telephony.externalcall.hide",
        &[("CALL_ID", &id), ("USER_ID", "12")],
    )
    .await;
    assert_eq!(body["result"], json!(false));

    let (status, body) = b24
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": id, "USER_ID": 11, "DURATION": 10}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "");
    assert_eq!(body["error_description"], CALL_NOT_FOUND);
    let call = b24.call(&id).unwrap();
    assert_eq!(call.finish_count, 2);
    assert_eq!(call.finished.unwrap()["USER_PHONE_INNER"], "101");
    assert_eq!(call.finished_by, Some(11));
}

#[tokio::test]
async fn attach_record_needs_a_finished_call_and_real_audio_names() {
    let b24 = FakeBitrix24::start().await;
    let id = registered(&b24, json!({})).await;
    let audio =
        base64::engine::general_purpose::STANDARD.encode(b"RIFF....WAVEfmt fake audio bytes >>>");
    let attach = |extra: Value| {
        let mut p = json!({"CALL_ID": id, "FILENAME": "rec.wav", "FILE_CONTENT": audio});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        let b24 = &b24;
        async move {
            b24.call_webhook("telephony.externalCall.attachRecord", &p)
                .await
        }
    };
    let (status, body) = attach(json!({})).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some(NOT_IN_STATISTIC))
    );
    let (status, _) = b24
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": id, "USER_ID": 11, "DURATION": 42}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = attach(json!({"FILENAME": "rec.ogg"})).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (
            400,
            Some("Wrong file extension. Only wav and mp3 are allowed")
        )
    );
    let (status, body) = attach(json!({"FILE_CONTENT": "not base64!"})).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (
            400,
            Some("File content is not properly encoded. Base64 encoding is expected.")
        )
    );
    let (status, body) = attach(json!({})).await;
    assert_eq!(status, 200, "{body}");
    let first = body["result"]["FILE_ID"].as_i64().unwrap();
    let (status, body) = attach(json!({"FILENAME": "rec2.MP3"})).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["result"]["FILE_ID"].as_i64().unwrap(), first);
    let call = b24.call(&id).unwrap();
    assert_eq!(call.records.len(), 2);
    assert_eq!(call.records[0]["replaced"], true);
    assert_eq!(call.records[1]["replaced"], false);
    assert_eq!(call.records[1]["FILE_CONTENT"], json!({"bytes": 36}));
    assert_eq!(
        b24.record_bytes(&id).unwrap(),
        b"RIFF....WAVEfmt fake audio bytes >>>"
    );
}

/// The forms a handler received.
type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A tiny local server: `/rec.mp3` is audio, anything else 404; every form posted to `/hook`
/// is kept.
async fn local_server() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let data = web::Data::new(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route(
                "/rec.mp3",
                web::get().to(|| async {
                    HttpResponse::Ok()
                        .content_type("audio/mpeg")
                        .body(vec![0xFFu8, 0xFB, 1, 2, 3])
                }),
            )
            .route(
                "/hook",
                web::post().to(
                    |seen: web::Data<Seen>, form: web::Form<Vec<(String, String)>>| async move {
                        seen.lock().unwrap().push(form.into_inner());
                        HttpResponse::Ok().finish()
                    },
                ),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (url, seen)
}

#[tokio::test]
async fn attach_record_by_url_fetches_it_at_once() {
    let b24 = FakeBitrix24::start().await;
    let (local, _) = local_server().await;
    let id = registered(&b24, json!({})).await;
    b24.call_webhook(
        "telephony.externalcall.finish",
        &json!({"CALL_ID": id, "USER_ID": 11, "DURATION": 5}),
    )
    .await;
    let (status, body) = b24
        .call_webhook(
            "telephony.externalcall.attachrecord",
            &json!({"CALL_ID": id, "RECORD_URL": format!("{local}/missing.mp3")}),
        )
        .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("Server returns HTTP error code 404"))
    );
    let (status, body) = b24
        .call_webhook(
            "telephony.externalcall.attachrecord",
            &json!({"CALL_ID": id, "RECORD_URL": format!("{local}/rec.mp3")}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rec = b24.call(&id).unwrap().records[0].clone();
    assert_eq!(rec["fetched_status"], 200);
    assert_eq!(rec["fetched_bytes"], 5);
    assert_eq!(rec["fetched_type"], "audio/mpeg");
}

#[tokio::test]
async fn batch_runs_in_order_with_result_substitution() {
    let b24 = FakeBitrix24::start().await;
    // Form-encoded like PHP's http_build_query: the reference is url-encoded inside the value.
    let reg = "telephony.externalcall.register?USER_ID=11&PHONE_NUMBER=%2B79990001111&TYPE=2&EXTERNAL_CALL_ID=x1";
    let fin = "telephony.externalcall.finish?CALL_ID=%24result%5Bz_reg%5D%5BCALL_ID%5D&USER_ID=11&DURATION=7";
    let (status, body) = form(
        &b24,
        "batch",
        &[("halt", "0"), ("cmd[z_reg]", reg), ("cmd[a_fin]", fin)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    let id = r["result"]["z_reg"]["CALL_ID"].as_str().unwrap();
    assert_eq!(r["result"]["a_fin"]["CALL_ID"], id);
    assert_eq!(r["result_error"], json!([]));
    assert!(r["result_time"]["a_fin"]["duration"].is_number());
    assert_eq!(b24.call(id).unwrap().finished.unwrap()["DURATION"], "7");
    let reqs = b24.requests();
    assert_eq!(
        reqs.iter()
            .map(|r| (r.method.as_str(), r.in_batch))
            .collect::<Vec<_>>(),
        vec![
            ("batch", false),
            ("telephony.externalcall.register", true),
            ("telephony.externalcall.finish", true),
        ]
    );
    assert_eq!(reqs[2].params["CALL_ID"], id);

    // JSON: plain strings; a nested batch is refused, a failing item does not stop the rest,
    // halt stops at the first error; list results need an index.
    // (A raw body: serde_json would sort the keys, and their order is the order of execution.)
    let raw = r#"{"cmd": {
        "users": "user.get?FILTER[ACTIVE]=Y",
        "first": "user.get?ID=$result[users][0][ID]",
        "nested": "batch?cmd[a]=scope",
        "bad": "telephony.externalcall.finish?CALL_ID=nope&USER_ID=11",
        "after": "scope"}}"#;
    let (status, body) = send(
        reqwest::Client::new()
            .post(format!("{}batch", b24.webhook_url()))
            .header("content-type", "application/json")
            .body(raw),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["result"]["first"][0]["ID"], "1");
    assert_eq!(r["result_total"]["users"], 5);
    assert_eq!(
        r["result_error"]["nested"]["error"],
        "ERROR_BATCH_METHOD_NOT_ALLOWED"
    );
    assert_eq!(
        r["result_error"]["bad"]["error_description"],
        CALL_NOT_FOUND
    );
    assert_eq!(r["result"]["after"], json!(["telephony", "crm", "user"]));
    let cmd = json!([
        "telephony.externalcall.finish?CALL_ID=nope&USER_ID=11",
        "scope"
    ]);
    let (_, body) = b24
        .call_webhook("batch", &json!({"halt": 1, "cmd": cmd}))
        .await;
    assert_eq!(body["result"]["result"], json!([]), "{body}");
    assert_eq!(
        body["result"]["result_error"][0]["error_description"],
        CALL_NOT_FOUND
    );

    // 51 items: the 51st is refused, the first 50 run; a batch counts once in the bucket.
    b24.set_bucket(2, 0.0);
    let cmd: Vec<String> = (0..51).map(|_| "server.time".to_string()).collect();
    let (status, body) = b24.call_webhook("batch", &json!({"cmd": cmd})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["result"].as_array().unwrap().len(), 50);
    assert_eq!(
        body["result"]["result_error"]["50"]["error"],
        "ERROR_BATCH_LENGTH_EXCEEDED"
    );
    assert_eq!(b24.call_webhook("scope", &json!({})).await.0, 200);
    assert_eq!(b24.call_webhook("scope", &json!({})).await.0, 503);
}

async fn token(b24: &FakeBitrix24, query: &[(&str, &str)]) -> (u16, Value) {
    send(
        reqwest::Client::new()
            .get(b24.oauth_token_url())
            .query(query),
    )
    .await
}

#[tokio::test]
async fn oauth_codes_and_refresh_tokens_work_once() {
    let b24 = FakeBitrix24::start().await;
    let http = reqwest::Client::new();
    let code = b24.issue_code();
    let grant = [
        ("grant_type", "authorization_code"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("code", code.as_str()),
    ];
    let (status, first) = token(&b24, &grant).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["member_id"], MEMBER_ID);
    assert_eq!(first["expires_in"], 3600);
    assert_eq!(first["client_endpoint"], format!("{}/rest/", b24.url));
    assert_eq!(token(&b24, &grant).await.1["error"], "invalid_grant");
    let access = first["access_token"].as_str().unwrap();
    let (status, body) = send(
        http.get(format!("{}/rest/scope.json", b24.url))
            .query(&[("auth", access)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(b24.requests()[0].auth, "oauth");

    let refresh = first["refresh_token"].as_str().unwrap();
    let wrong = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT_ID),
        ("client_secret", "nope"),
        ("refresh_token", refresh),
    ];
    assert_eq!(token(&b24, &wrong).await.1["error"], "invalid_client");
    // POST form, as MIKO does.
    let grant = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("refresh_token", refresh),
    ];
    let (status, second) = send(http.post(b24.oauth_token_url()).form(&grant)).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let (status, body) = token(&b24, &grant).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(b24.refreshes(), 1);

    b24.expire_access_tokens();
    let new_access = second["access_token"].as_str().unwrap();
    let (status, body) = send(
        http.post(format!("{}/rest/profile", b24.url))
            .json(&json!({"auth": new_access})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("expired_token"))
    );
    let (status, body) = send(
        http.post(format!("{}/rest/profile", b24.url))
            .form(&[("auth", "unknown")]),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
}

#[tokio::test]
async fn click_to_call_registers_then_posts_the_event_form() {
    let b24 = FakeBitrix24::start().await;
    let (local, seen) = local_server().await;
    // The portal compares digits: "8 999…" and "+7 999…" are different numbers to it.
    let contact = b24.add_contact("8 999 555-44-33", 12);
    let (call_id, status) = b24
        .click_to_call(&format!("{local}/hook"), 11, "8 (999) 555-44-33")
        .await;
    assert_eq!(status, 200);
    let forms = seen.lock().unwrap().clone();
    assert_eq!(forms.len(), 1);
    let f: std::collections::BTreeMap<String, String> = forms[0].iter().cloned().collect();
    assert_eq!(f["event"], "ONEXTERNALCALLSTART");
    assert_eq!(f["data[CALL_ID]"], call_id);
    assert_eq!(f["data[USER_ID]"], "11");
    assert_eq!(f["data[PHONE_NUMBER]"], "8 (999) 555-44-33");
    assert_eq!(f["data[PHONE_NUMBER_INTERNATIONAL]"], "+79995554433");
    assert_eq!(f["data[CRM_ENTITY_TYPE]"], "CONTACT");
    assert_eq!(f["data[CRM_ENTITY_ID]"], contact.to_string());
    assert_eq!(f["auth[application_token]"], fake_bitrix24::APP_TOKEN);
    assert_eq!(f["auth[member_id]"], MEMBER_ID);
    let call = b24.call(&call_id).unwrap();
    assert!(call.by_portal);
    assert_eq!(
        (call.kind, call.user_id, call.external_call_id.clone()),
        (1, 11, None)
    );
    assert_eq!(b24.open_cards(), vec![(call_id.clone(), 11)]);
    // Nothing of this is a REST request.
    assert!(b24.requests().is_empty());
    let got = b24
        .wait_for(Duration::from_secs(1), "the click-to-call call", |b| {
            b.call(&call_id)
        })
        .await;
    assert_eq!(got.phone, "89995554433");
}

#[tokio::test]
async fn crm_lookups_and_user_paging() {
    let b24 = FakeBitrix24::start().await;
    let contact = b24.add_contact("+7 (999) 777-66-55", 13);
    let (_, body) = form(
        &b24,
        "telephony.externalCall.searchCrmEntities",
        &[("PHONE_NUMBER", "+79997776655")],
    )
    .await;
    let hit = &body["result"][0];
    assert_eq!(
        (
            hit["CRM_ENTITY_TYPE"].as_str(),
            hit["CRM_ENTITY_ID"].as_i64()
        ),
        (Some("CONTACT"), Some(contact))
    );
    assert_eq!(hit["ASSIGNED_BY"]["USER_PHONE_INNER"], "103");
    let (_, body) = form(
        &b24,
        "crm.duplicate.findbycomm",
        &[("type", "PHONE"), ("values[]", "+79997776655")],
    )
    .await;
    assert_eq!(body["result"], json!({"CONTACT": [contact]}));
    let (_, body) = form(
        &b24,
        "crm.duplicate.findbycomm",
        &[("type", "PHONE"), ("values[]", "+70000000000")],
    )
    .await;
    assert_eq!(body["result"], json!([]));
    let (_, body) = form(&b24, "crm.contact.get", &[("id", &contact.to_string())]).await;
    assert_eq!(body["result"]["ASSIGNED_BY_ID"], "13");
    // register binds the contact; CRM_CREATE makes a lead for an unknown number.
    let (_, body) = register(&b24, json!({"PHONE_NUMBER": "+7 999 777 66 55"})).await;
    assert_eq!(
        (
            body["result"]["CRM_ENTITY_TYPE"].as_str(),
            body["result"]["CRM_ENTITY_ID"].as_i64()
        ),
        (Some("CONTACT"), Some(contact))
    );
    let (_, body) = register(
        &b24,
        json!({"PHONE_NUMBER": "+79990000001", "CRM_CREATE": "1"}),
    )
    .await;
    let lead = body["result"]["CRM_CREATED_LEAD"].as_i64().unwrap();
    assert_eq!(body["result"]["CRM_ENTITY_TYPE"], "LEAD");
    let (_, body) = register(
        &b24,
        json!({"PHONE_NUMBER": "+79990000002", "CRM_CREATE": "0"}),
    )
    .await;
    assert_eq!(body["result"]["CRM_CREATED_LEAD"], Value::Null);
    assert_eq!(
        b24.leads().iter().map(|l| l.id).collect::<Vec<_>>(),
        vec![lead]
    );

    for id in 100..200 {
        b24.add_user(id, Some(&format!("5{id}")), id % 2 == 0);
    }
    let (_, body) = form(&b24, "user.get", &[("FILTER[ACTIVE]", "true")]).await;
    assert_eq!(body["total"], 55);
    assert_eq!(body["next"], 50);
    assert_eq!(body["result"].as_array().unwrap().len(), 50);
    assert!(body["result"][0]["ID"].is_string());
    let (_, body) = form(
        &b24,
        "user.get",
        &[("FILTER[ACTIVE]", "true"), ("start", "50")],
    )
    .await;
    assert!(body.get("next").is_none(), "{body}");
    assert_eq!(body["result"].as_array().unwrap().len(), 5);
    assert_eq!(body["total"], 55);
    let (_, body) = form(&b24, "user.get", &[("filter[UF_PHONE_INNER]", "102")]).await;
    assert_eq!(body["result"][0]["ID"], "12");
    assert_eq!(body["total"], 1);
}

#[tokio::test]
async fn outage_scripted_faults_and_strict_auth_type() {
    let b24 = FakeBitrix24::start().await;
    b24.set_outage(true);
    let r = reqwest::get(format!("{}scope", b24.webhook_url()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.text().await.unwrap().contains("<html>"));
    b24.set_outage(false);

    b24.fail_next(
        "Telephony.ExternalCall.Register",
        500,
        "INTERNAL_SERVER_ERROR",
        "boom",
    );
    let (status, body) = register(&b24, json!({})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("INTERNAL_SERVER_ERROR"))
    );
    assert_eq!(register(&b24, json!({})).await.0, 200);

    b24.set_strict_auth_type(true);
    let (status, body) = register(&b24, json!({"EXTERNAL_CALL_ID": "s"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("WRONG_AUTH_TYPE"))
    );
    let (access, _) = b24.issue_tokens();
    let (status, body) = send(
        reqwest::Client::new()
            .post(format!(
                "{}/rest/telephony.externalcall.register?auth={access}",
                b24.url
            ))
            .json(&json!({"USER_ID": 11, "PHONE_NUMBER": "+79990000003", "TYPE": 2})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["result"]["CALL_ID"].as_str().unwrap();
    assert_eq!(b24.call(id).unwrap().registered_via, "oauth");
}

#[test]
fn php_brackets_decode_like_php() {
    let v = php_parse_query(
        "USER_ID[]=1&USER_ID[]=2&FILTER[ACTIVE]=true&cmd[a]=x%3Fy%3D1&n[2]=a&plain=%2B7",
    );
    assert_eq!(
        v,
        json!({"USER_ID": ["1", "2"], "FILTER": {"ACTIVE": "true"}, "cmd": {"a": "x?y=1"},
               "n": {"2": "a"}, "plain": "+7"})
    );
}
