//! What the running binary writes to its log: one line per event, whatever the peers send.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::cli::{env_for, serve_logged};
use crate::support::{FakeAmi, FakeCrm, Fault};

/// Lines logged until one contains `marker` (at most 20 s), that one included.
async fn lines_until(log: &mut UnboundedReceiver<String>, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.recv().await {
            let done = line.contains(marker);
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("pbxgate exited");
    })
    .await;
    assert!(found.is_ok(), "no log line with {marker:?} in {seen:#?}");
    seen
}

#[tokio::test]
async fn a_crm_html_error_page_and_a_refused_request_are_one_line_each() {
    const FORGED: &str =
        "2026-12-01T00:00:00.000000Z  INFO pbxgate::crm::retailcrm::registration: registered in retailCRM";
    let page = format!(
        "<!DOCTYPE html>\r\n<html>\r\n<head><title>Not found</title></head>\r\n{FORGED}\r\n<body>{}</body>\r\n<p>END-OF-PAGE</p></html>\r\n",
        "x".repeat(3000)
    );
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    crm.fail_next_on(
        "/api/v5/integration-modules/pbxgate/edit",
        Fault::Raw {
            status: 404,
            content_type: "text/html; charset=utf-8",
            body: page,
        },
    );
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.extend([
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__LOG__LEVEL", "info".to_string()),
    ]);
    let (_child, base, mut log) = serve_logged(dir.path(), &env).await;

    // The account-missing page, as the CRM sent it, is one line: escaped and cut.
    let lines = lines_until(&mut log, "registration refused").await;
    let refused = lines.last().unwrap();
    assert!(
        refused.contains(r"<!DOCTYPE html>\r\n<html>\r\n"),
        "{refused}"
    );
    assert!(refused.contains(&format!(r"\r\n{FORGED}\r\n")), "{refused}");
    assert!(
        !refused.contains("END-OF-PAGE") && refused.len() < 1000,
        "{refused}"
    );

    // One refused request, one line (with its reason); a second request fences the log.
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/crm/make-call"))
        .query(&[
            ("clientId", "wrong-client-id-0000"),
            ("code", "101"),
            ("phone", "+79991234567"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get(format!("{base}/log-fence")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let later = lines_until(&mut log, "/log-fence").await;

    let all: Vec<&String> = lines.iter().chain(&later).collect();
    assert!(
        !all.iter().any(|l| l.starts_with(FORGED)),
        "the page's lines stay inside its one log line: {all:#?}"
    );
    let about_403: Vec<&&String> = all.iter().filter(|l| l.contains("status=403")).collect();
    assert_eq!(about_403.len(), 1, "{about_403:#?}");
    assert!(
        about_403[0].contains("/crm/make-call") && about_403[0].contains("reason="),
        "{}",
        about_403[0]
    );
}
