//! The binary itself: exit codes and messages.

use std::process::Output;

use tokio::process::Command;

use pbxgate::crm::retailcrm::UserStatus;
use pbxgate::store::StoredUserStatus;

use crate::support::{fake_crm, FakeAmi, FakeCrm};

async fn pbxgate(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pbxgate"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run pbxgate")
}

#[tokio::test]
async fn invalid_config_exits_2_with_one_line_per_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[crm]\nurl = \"nope\"\nrps = 0\n[ami]\nport = 0\n").unwrap();
    let out = pbxgate(
        dir.path(),
        &["--config", path.to_str().unwrap(), "check"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines.iter().any(|l| l.contains("crm.url")), "{err}");
    assert!(lines.iter().any(|l| l.contains("crm.rps")), "{err}");
    assert!(lines.iter().any(|l| l.contains("ami.port")), "{err}");

    let out = pbxgate(
        dir.path(),
        &["check"],
        &[("PBXGATE__CRM__NO_SUCH_KEY", "1".into())],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crm.no_such_key: unknown key"));
}

pub(crate) fn env_for(
    dir: &std::path::Path,
    crm: &FakeCrm,
    ami: &FakeAmi,
    ami_secret: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("PBXGATE__CRM__URL", crm.url.clone()),
        ("PBXGATE__CRM__API_KEY", fake_crm::API_KEY.to_string()),
        ("PBXGATE__AMI__HOST", "127.0.0.1".to_string()),
        ("PBXGATE__AMI__PORT", ami.addr.port().to_string()),
        ("PBXGATE__AMI__SECRET", ami_secret.to_string()),
        (
            "PBXGATE__STORAGE__PATH",
            dir.join("store").display().to_string(),
        ),
    ]
}

#[tokio::test]
async fn check_warns_that_calls_nobody_took_cannot_reach_the_crm() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s3cret").await;
    let out = pbxgate(
        dir.path(),
        &["check"],
        &env_for(dir.path(), &crm, &ami, "s3cret"),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A warning, not a failure: everything else works.
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.starts_with('!')).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(warnings[0].contains("calls.unassigned_code"), "{stdout}");
}

#[tokio::test]
async fn check_passes_against_working_peers_and_fails_on_a_wrong_ami_secret() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s3cret").await;

    let mut env = env_for(dir.path(), &crm, &ami, "s3cret");
    env.push(("PBXGATE__CALLS__UNASSIGNED_CODE", "100".to_string()));
    let out = pbxgate(dir.path(), &["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with('✓')), "{stdout}");
    assert!(stdout.contains("telephony_write"), "{stdout}");

    let out = pbxgate(
        dir.path(),
        &["check"],
        &env_for(dir.path(), &crm, &ami, "wrong"),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let ami_line = stdout.lines().find(|l| l.contains("AMI")).unwrap();
    assert!(
        ami_line.starts_with('✗') && ami_line.contains("Authentication failed"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("wrong") && !stdout.contains(fake_crm::API_KEY),
        "no secrets printed: {stdout}"
    );
}

#[tokio::test]
async fn check_reports_an_unusable_crm_key() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.push(("PBXGATE__CRM__API_KEY", "not-the-key".into()));
    let out = pbxgate(dir.path(), &["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("✗ CRM") && l.contains("API key")),
        "{stdout}"
    );
}

#[tokio::test]
async fn register_command_registers_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.push(("PBXGATE__USERS", "[{user_id = 7, code = \"107\"}]".into()));
    let out = pbxgate(dir.path(), &["register"], &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let module = crm.module().expect("module registered");
    assert_eq!(
        module["integrations"]["telephony"]["additionalCodes"],
        serde_json::json!([{"userId": 7, "code": "107"}])
    );
    // The clientId generated by `register` is the one `serve` will check: it is in the store.
    let id = module["clientId"].as_str().unwrap();
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn serve_applies_stored_statuses_when_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    // A previous run stored two statuses.
    {
        let store = pbxgate::store::Store::open(&dir.path().join("store")).unwrap();
        for (user_id, code, status) in [(7, "101", UserStatus::Break), (2, "102", UserStatus::Free)]
        {
            let rec = StoredUserStatus {
                v: 1,
                user_id,
                code: code.into(),
                status,
                since: 1,
            };
            store.put_user_status(&rec).await.unwrap();
        }
    }
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.push(("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".into()));
    env.push(("PBXGATE__CRM__REGISTER_ON_START", "false".into()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pbxgate"));
    cmd.arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .kill_on_drop(true);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let ps = ami.wait_for_actions("QueuePause", 2).await;
    let mut seen: Vec<_> = ps
        .iter()
        .map(|p| (p.get("Interface").unwrap(), p.get("Paused").unwrap()))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("PJSIP/101", "true"), ("PJSIP/102", "false")]);
    // SIGTERM stops it cleanly.
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Starts `pbxgate serve` and returns it once it listens (read from its log), with its address.
pub(crate) async fn serve(
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (tokio::process::Child, String) {
    let (child, base, _log) = serve_logged(dir, env).await;
    (child, base)
}

/// Like [`serve`], with every line it logs.
pub(crate) async fn serve_logged(
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (
    tokio::process::Child,
    String,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pbxgate"));
    cmd.arg("serve");
    spawn_serving_logged(cmd, dir, env).await
}

/// Like [`serve`] for a command that ends up running `pbxgate serve` (e.g. through a shell).
pub(crate) async fn spawn_serving(
    cmd: Command,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (tokio::process::Child, String) {
    let (child, base, _log) = spawn_serving_logged(cmd, dir, env).await;
    (child, base)
}

async fn spawn_serving_logged(
    mut cmd: Command,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (
    tokio::process::Child,
    String,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::AsyncBufReadExt;
    cmd.current_dir(dir).env_clear().kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line.clone());
            if line.contains("pbxgate started") {
                let listen = line
                    .split("listen=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap();
                return listen.to_string();
            }
        }
        panic!("pbxgate exited before listening");
    })
    .await
    .expect("pbxgate starts");
    // Keep draining its log so it never blocks on a full pipe (shown with a failing test's
    // output, and to whoever holds the receiver).
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("pbxgate: {line}");
            let _ = tx.send(line);
        }
    });
    (child, format!("http://{addr}"), rx)
}

#[tokio::test]
async fn a_kill_during_upload_loses_nothing() {
    const CALLS: usize = 500;
    const TOKEN: &str = "crash-test-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    crm.slow_down(
        "/api/v5/telephony/calls/upload",
        std::time::Duration::from_millis(25),
    );
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.extend([
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__CRM__REGISTER_ON_START", "false".to_string()),
        ("PBXGATE__PBX__TOKEN", TOKEN.to_string()),
        ("PBXGATE__HISTORY__BATCH_WINDOW", "20ms".to_string()),
        ("PBXGATE__HISTORY__RETRY_BASE", "100ms".to_string()),
        ("PBXGATE__HISTORY__RETRY_MAX", "1s".to_string()),
        ("PBXGATE__LOG__LEVEL", "info".to_string()),
    ]);
    let (mut first, base) = serve(dir.path(), &env).await;
    let http = reqwest::Client::new();
    for chunk in 0..CALLS / 10 {
        let events: Vec<serde_json::Value> = (0..10)
            .flat_map(|i| {
                let id = format!("k{:04}", chunk * 10 + i);
                [
                    serde_json::json!({"call_id": id, "event": "start", "direction": "in", "phone": "+79991234567", "extension": "101"}),
                    serde_json::json!({"call_id": id, "event": "hangup"}),
                ]
            })
            .collect();
        let r = http
            .post(format!("{base}/pbx/events"))
            .bearer_auth(TOKEN)
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Uploads are under way: kill it at a random moment.
    crm.wait_for_requests("/api/v5/telephony/calls/upload", 1)
        .await;
    let pause = std::time::Duration::from_millis(rand::random::<u64>() % 150);
    tokio::time::sleep(pause).await; // a random kill point, not synchronisation
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let before_restart = crm.calls().len();

    let (_second, _) = serve(dir.path(), &env).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while crm.calls().len() < CALLS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {CALLS} calls arrived",
            crm.calls().len()
        );
        let seen = crm.requests_to("/api/v5/telephony/calls/upload").len();
        crm.wait_for_requests("/api/v5/telephony/calls/upload", seen + 1)
            .await;
    }
    let counts = crm.upload_counts();
    assert_eq!(counts.len(), CALLS, "every call arrived");
    let redelivered: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "killed after {pause:?}: {before_restart} calls had arrived; after the restart all {CALLS} arrived, \
         {} delivered again and reported by the CRM as duplicates",
        redelivered.len()
    );
    // A call delivered twice is one whose batch was in flight at the kill: at most one batch.
    assert!(redelivered.len() <= 50, "{redelivered:?}");
}

#[tokio::test]
async fn backfill_then_outbox_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cdr = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/ami-captures/cdr/Master.csv"
    );
    let env = vec![
        (
            "PBXGATE__STORAGE__PATH",
            dir.path().join("store").display().to_string(),
        ),
        (
            "PBXGATE__CALLS__INBOUND_CONTEXTS",
            "[\"from-trunk\"]".to_string(),
        ),
    ];
    let args = [
        "backfill",
        "--from",
        "2026-11-21",
        "--to",
        "2026-11-21",
        "--cdr",
        cdr,
    ];
    let dry: Vec<&str> = args.iter().copied().chain(["--dry-run"]).collect();
    let out = pbxgate(dir.path(), &dry, &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("19 call(s) would be queued"));

    let out = pbxgate(dir.path(), &args, &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("19 call(s) queued"));
    // Again: all known already.
    let out = pbxgate(dir.path(), &args, &env).await;
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("0 call(s) queued for upload, 19 already known"));

    let out = pbxgate(dir.path(), &["outbox", "stats"], &env).await;
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        stats.contains("pending  19") && stats.contains("dead     0"),
        "{stats}"
    );
    let out = pbxgate(
        dir.path(),
        &["outbox", "list", "--state", "pending", "--limit", "2"],
        &env,
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let out = pbxgate(dir.path(), &["outbox", "retry", "--all-dead"], &env).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 record(s)"));

    // While another process holds the store, the commands say so plainly.
    let _held = pbxgate::store::Store::open(&dir.path().join("store")).unwrap();
    let out = pbxgate(dir.path(), &["outbox", "stats"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("held by a running pbxgate"));
}
