//! `pbxgate outbox` and `pbxgate check` while the service runs: the real binary talks to the
//! running service's admin API (found from the config's `http.listen` and `admin.token`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::admin_api::dead_call;
use crate::support::TestApp;

const TOKEN: &str = "admin-token-0123456789";
const WAIT: Duration = Duration::from_secs(20);

async fn app(token: Option<&str>) -> TestApp {
    TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        if let Some(t) = token {
            c.admin.token = pbxgate::base::secret::Secret::new(t);
        }
    })
    .await
}

/// A config file for the command: the service's listen address, a store and a token.
fn cli_config(dir: &Path, listen: &str, store: &Path, token: Option<&str>) -> PathBuf {
    let path = dir.join(format!("cli-{}.toml", rand::random::<u32>()));
    let mut text = format!(
        "[http]\nlisten = {listen:?}\n[storage]\npath = {:?}\n",
        store.display().to_string()
    );
    if let Some(t) = token {
        text.push_str(&format!("[admin]\ntoken = {t:?}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn pbxgate(config: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_pbxgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .expect("run pbxgate");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn listen(app: &TestApp) -> String {
    app.state.config.http.listen.clone()
}

#[tokio::test]
async fn outbox_commands_use_the_running_service_and_a_retried_call_reaches_the_crm() {
    let app = app(Some(TOKEN)).await;
    dead_call(&app, "cli-dead1").await;
    let config = cli_config(
        app.dir.path(),
        &listen(&app),
        &app.state.config.storage.path,
        Some(TOKEN),
    );

    let run = pbxgate(&config, &["outbox", "stats"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("pending  0") && run.stdout.contains("dead     1"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("oldest pending: -"), "{}", run.stdout);
    assert!(
        run.stderr.contains("using the running service"),
        "{}",
        run.stderr
    );

    let run = pbxgate(&config, &["outbox", "list", "--state", "dead"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    let fields: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(fields[0], "cli-dead1", "{}", run.stdout);
    assert_eq!(fields[4], "attempts=0", "{}", run.stdout);
    assert_eq!(
        fields[5], "phone: This value should not be blank.",
        "{}",
        run.stdout
    );
    let run = pbxgate(&config, &["outbox", "list", "--state", "pending"]).await;
    assert_eq!(run.stdout, "", "nothing pending");

    // --offline opens the store, which the service holds.
    let run = pbxgate(&config, &["outbox", "stats", "--offline"]).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("held by a running pbxgate"),
        "{}",
        run.stderr
    );

    // Counting again needs the store, which the service owns.
    let run = pbxgate(&config, &["outbox", "stats", "--recount"]).await;
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("--recount"), "{}", run.stderr);

    assert!(!app.crm.calls().contains_key("cli-dead1"));
    let run = pbxgate(&config, &["outbox", "retry", "--id", "cli-dead1"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "1 record(s) moved back to pending\n");
    app.crm
        .wait_for_call("cli-dead1", WAIT)
        .await
        .expect("the retried call reaches the CRM while the service runs");

    // Not dead any more, and an unknown id: nothing moves, and the service says why.
    let run = pbxgate(&config, &["outbox", "retry", "--id", "cli-dead1"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "0 record(s) moved back to pending\n");
    assert!(run.stderr.contains("not dead"), "{}", run.stderr);
    let run = pbxgate(&config, &["outbox", "retry", "--id", "no such/call"]).await;
    assert_eq!(run.stdout, "0 record(s) moved back to pending\n");
    assert!(
        run.stderr.contains("no call no such/call"),
        "{}",
        run.stderr
    );

    let store = app.state.outbox.store();
    for id in ["cli-dead2", "cli-dead3"] {
        store
            .insert(crate::support::call_record(id, crate::support::T0))
            .unwrap();
        let (_, env) = store.find(id).unwrap().unwrap();
        store.mark_dead(&env.unwrap(), "rejected").unwrap();
    }
    let run = pbxgate(&config, &["outbox", "retry", "--all-dead"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "2 record(s) moved back to pending\n");
    for id in ["cli-dead2", "cli-dead3"] {
        app.crm
            .wait_for_call(id, WAIT)
            .await
            .expect("every retried call reaches the CRM");
    }
}

#[tokio::test]
async fn check_runs_through_the_running_service() {
    // No token on a loopback listen: the open mode, where changes need the header.
    let app = app(None).await;
    app.ami_connected().await;
    let config = cli_config(
        app.dir.path(),
        &listen(&app),
        &app.state.config.storage.path,
        None,
    );
    let run = pbxgate(&config, &["check"]).await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("✓ config valid (the running service's)"),
        "{}",
        run.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("✓ store writable")),
        "{}",
        run.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("✓ AMI")),
        "{}",
        run.stdout
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with('✓') || l.starts_with('!')),
        "{}",
        run.stdout
    );

    // A failing check fails the command the same way: the PBX refuses the login now.
    app.ami.set_reply(
        "Login",
        crate::support::fake_ami::Reply::Error("Authentication failed".into()),
    );
    let run = pbxgate(&config, &["check"]).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.lines().any(|l| l.starts_with("✗ AMI")),
        "{}",
        run.stdout
    );

    // --offline opens the store, which the service holds.
    let run = pbxgate(&config, &["check", "--offline"]).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout.contains("✗ store cannot be opened"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_a_clear_error_not_a_store_error() {
    let app = app(Some(TOKEN)).await;
    let store = app.state.config.storage.path.clone();
    for token in [Some("wrong-token-0123456789"), None] {
        let config = cli_config(app.dir.path(), &listen(&app), &store, token);
        for args in [&["outbox", "stats"][..], &["check"]] {
            let run = pbxgate(&config, args).await;
            assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
            assert_eq!(run.stdout, "", "{args:?}");
            assert!(
                run.stderr.contains("refuses the admin token")
                    && run.stderr.contains("PBXGATE__ADMIN__TOKEN"),
                "{args:?}: {}",
                run.stderr
            );
            assert!(!run.stderr.contains("held by"), "{}", run.stderr);
            assert!(!run.stderr.contains(TOKEN), "{}", run.stderr);
            assert!(!run.stderr.contains("wrong-token"), "{}", run.stderr);
        }
    }
}

#[tokio::test]
async fn a_service_refusing_its_admin_api_is_reached_on_loopback_and_explained() {
    // Listening on every address without a token: the admin routes answer 403.
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.http.listen = c.http.listen.replace("127.0.0.1", "0.0.0.0");
    })
    .await;
    let config = cli_config(
        app.dir.path(),
        &listen(&app),
        &app.state.config.storage.path,
        None,
    );
    let run = pbxgate(&config, &["outbox", "stats"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("refuses its admin API") && run.stderr.contains("admin.token"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_service_of_another_store_is_not_used() {
    let app = app(None).await;
    let other = tempfile::tempdir().unwrap();
    let config = cli_config(
        other.path(),
        &listen(&app),
        &other.path().join("store"),
        None,
    );
    let run = pbxgate(&config, &["outbox", "stats"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("pending  0"), "{}", run.stdout);
    assert!(!run.stderr.contains("running service"), "{}", run.stderr);
    // The store is this command's own: it was created by opening it.
    assert!(other.path().join("store").exists());
}

#[tokio::test]
async fn the_queue_view_filters_by_state_and_limit_and_names_a_bad_parameter() {
    let app = app(None).await;
    dead_call(&app, "q-dead1").await;
    let store = app.state.outbox.store();
    store
        .insert(crate::support::call_record("q-dead2", crate::support::T0))
        .unwrap();
    let (_, env) = store.find("q-dead2").unwrap().unwrap();
    store.mark_dead(&env.unwrap(), "rejected").unwrap();

    let get = |q: &str| {
        let url = app.url(&format!("/admin/api/queue{q}"));
        let http = app.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (code, body) = get("?state=dead&limit=1").await;
    assert_eq!(code, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["state"], "dead");
    assert_eq!(items[0]["outcome"], "answered", "{body}");
    assert_eq!(body["status"]["dead"], 2, "{body}");
    let (_, body) = get("?state=pending").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 0, "{body}");
    let (_, body) = get("").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 2, "{body}");

    for (q, field) in [
        ("?state=done", "state"),
        ("?limit=0", "limit"),
        ("?limit=many", "limit"),
    ] {
        let (code, body) = get(q).await;
        assert_eq!(code, 400, "{q}: {body}");
        assert!(body["errors"][field].is_string(), "{q}: {body}");
    }

    // Every dead call back to pending at once (a change: the header is required).
    let url = app.url("/admin/api/queue/retry-dead");
    let r = app.http.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .http
        .post(&url)
        .header("X-Pbxgate-Admin", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["moved"], 2);
}
