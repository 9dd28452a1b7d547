//! The dashboard in a real browser: headless Chromium driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`), against pbxgate on loopback.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::admin_api::{dead_call, webhook_call};
use crate::support::TestApp;

/// One browser at a time: each takes a core while it starts.
pub(crate) static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(20);

/// chromedriver on an ephemeral port and a headless Chromium session with a fresh profile.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub(crate) async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver)");
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("started successfully") {
                    return;
                }
            }
            panic!("chromedriver exited");
        })
        .await
        .expect("chromedriver started");
        // Keep reading its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // chromedriver speaks plain HTTP on loopback: no TLS.
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    pub(crate) async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    pub(crate) async fn close(mut self) {
        if let Ok(png) = self.client.screenshot().await {
            if let Some(dir) = std::env::var_os("DASHBOARD_SCREENSHOTS") {
                let _ = std::fs::write(
                    std::path::Path::new(&dir)
                        .join(format!("{}.png", self.driver.id().unwrap_or(0))),
                    png,
                );
            }
        }
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}

async fn open_app() -> TestApp {
    TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.pbx.token = pbxgate::base::secret::Secret::new("pbx-token-0123456789");
    })
    .await
}

#[tokio::test]
async fn a_webhook_call_appears_in_recent_calls_on_the_page() {
    let _one = BROWSER.lock().await;
    let app = open_app().await;
    let b = Browser::start().await;
    b.client.goto(&app.url("/")).await.unwrap();
    b.wait_for("#dashboard:not([hidden]) #links .card[data-link=AMI]")
        .await;
    b.wait_for("#conn.ok").await;
    webhook_call(&app, "page1", "+79991234567").await;
    let row = b.wait_for("#recent tr[data-id='pbx-page1']").await;
    let text = row.text().await.unwrap();
    assert!(text.contains("+799******67"), "{text}");
    assert!(text.contains("answered"), "{text}");
    assert!(text.contains("101"), "{text}");
    // The filter keeps matching rows only.
    b.client
        .find(Locator::Id("filter"))
        .await
        .unwrap()
        .send_keys("no such number")
        .await
        .unwrap();
    b.client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#recent-count"))
        .await
        .unwrap();
    let rows = b
        .client
        .find_all(Locator::Css("#recent tbody tr"))
        .await
        .unwrap();
    assert!(rows.is_empty(), "the filter hides the call");
    // Healthy links are green by meaning: the AMI link is up.
    b.wait_for("#links .card.ok[data-link=AMI]").await;
    b.close().await;
}

#[tokio::test]
async fn a_dead_call_is_retried_from_the_page_and_reaches_the_crm() {
    let _one = BROWSER.lock().await;
    let app = open_app().await;
    dead_call(&app, "pbx-dead1").await;
    let b = Browser::start().await;
    b.client.goto(&app.url("/")).await.unwrap();
    let row = b.wait_for("#queue tr[data-id='pbx-dead1']").await;
    assert!(
        row.text().await.unwrap().contains("phone"),
        "the CRM's reason is shown"
    );
    assert!(!app.crm.calls().contains_key("pbx-dead1"));
    b.wait_for("#queue tr[data-id='pbx-dead1'] button.retry")
        .await
        .click()
        .await
        .unwrap();
    app.crm
        .wait_for_call("pbx-dead1", WAIT)
        .await
        .expect("the retried call reaches the CRM");
    b.wait_for("#notice.ok").await;
    b.close().await;
}

#[tokio::test]
async fn the_demos_page_shows_what_its_sandbox_crm_received() {
    let _one = BROWSER.lock().await;
    let demo = crate::demo::start().await;
    let b = Browser::start().await;
    b.client.goto(&format!("{}/", demo.base)).await.unwrap();
    // A replayed call reaches the sandbox within seconds; the page lists it.
    let row = b
        .wait_for("#sandbox:not([hidden]) #sandbox-calls tbody tr")
        .await;
    let text = row.text().await.unwrap();
    assert!(text.contains("pbx-"), "{text}");
    b.close().await;
}

#[tokio::test]
async fn click_to_call_from_the_page_becomes_an_originate() {
    let _one = BROWSER.lock().await;
    let app = open_app().await;
    app.ami_connected().await;
    let b = Browser::start().await;
    b.client.goto(&app.url("/")).await.unwrap();
    b.wait_for("#dashboard:not([hidden]) #call-form").await;
    for (id, text) in [("call-code", "101"), ("call-phone", "+4930555123")] {
        b.client
            .find(Locator::Id(id))
            .await
            .unwrap()
            .send_keys(text)
            .await
            .unwrap();
    }
    b.client
        .find(Locator::Id("call-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    assert_eq!(o.get("Exten"), Some("+4930555123"));
    b.wait_for("#notice.ok").await;
    b.close().await;
}

#[tokio::test]
async fn with_a_token_the_page_asks_for_it_and_the_api_refuses_without_it() {
    const TOKEN: &str = "admin-token-0123456789";
    let _one = BROWSER.lock().await;
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.admin.token = pbxgate::base::secret::Secret::new(TOKEN);
    })
    .await;
    let r = app
        .http
        .get(app.url("/admin/api/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b = Browser::start().await;
    b.client.goto(&app.url("/")).await.unwrap();
    b.wait_for("#login:not([hidden])").await;
    assert!(b
        .client
        .find(Locator::Css("#dashboard[hidden]"))
        .await
        .is_ok());
    b.client
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("wrong-token-0123456789")
        .await
        .unwrap();
    b.client
        .find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::XPath(
            "//p[@id='login-error' and string-length(text()) > 0]",
        ))
        .await
        .unwrap();
    let token = b.client.find(Locator::Id("token")).await.unwrap();
    token.clear().await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    b.client
        .find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#dashboard:not([hidden]) #links .card[data-link=CRM]")
        .await;
    b.wait_for("#conn.ok").await;
    b.close().await;
}
