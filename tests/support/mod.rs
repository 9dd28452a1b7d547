//! Test support: the fake retailCRM, the scripted AMI peer, and a running pbxgate per test.
#![allow(dead_code, unused_imports)]

pub mod fake_ami;
pub mod fake_crm;

use std::net::TcpListener;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::web;
use pbxgate::app::Application;
use pbxgate::config::{Config, ExternalPhone, UserCode};
use pbxgate::http::AppState;
use pbxgate::secret::Secret;
use tempfile::TempDir;

pub use fake_ami::FakeAmi;
pub use fake_crm::{FakeCrm, Fault};

/// Logs go to the test output when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}

/// A config aimed at `crm` with a fresh store in `dir`, quick retries, two users, one number.
pub fn test_config(crm_url: &str, dir: &TempDir) -> Config {
    let mut c = Config::default();
    c.crm.url = crm_url.to_string();
    c.crm.api_key = Secret::new(fake_crm::API_KEY);
    c.crm.retry_base = Duration::from_millis(5);
    c.crm.retry_max = Duration::from_millis(50);
    c.crm.max_retries = 3;
    c.crm.timeout = Duration::from_secs(5);
    c.storage.path = dir.path().join("store");
    c.users = vec![
        UserCode {
            user_id: 1,
            code: "101".into(),
        },
        UserCode {
            user_id: 2,
            code: "102".into(),
        },
    ];
    c.external_phones = vec![ExternalPhone {
        site: "shop1".into(),
        number: "+74951234567".into(),
    }];
    c
}

pub struct TestApp {
    pub base: String,
    pub crm: FakeCrm,
    pub ami: FakeAmi,
    pub state: web::Data<AppState>,
    pub http: reqwest::Client,
    handle: ServerHandle,
    pub dir: TempDir,
}

impl TestApp {
    /// Starts a fake CRM and pbxgate on 127.0.0.1:0; `customize` adjusts the config first.
    pub async fn spawn(customize: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_with(FakeCrm::start().await, customize).await
    }

    /// Same, with a fake CRM prepared by the test (faults queued before startup).
    pub async fn spawn_with(crm: FakeCrm, customize: impl FnOnce(&mut Config)) -> TestApp {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let ami = FakeAmi::start("pbxgate", "ami-secret").await;
        let mut config = test_config(&crm.url, &dir);
        config.ami.port = ami.addr.port();
        config.ami.secret = Secret::new("ami-secret");
        config.ami.reconnect_min = Duration::from_millis(20);
        config.ami.reconnect_max = Duration::from_millis(200);
        config.http.listen = listener.local_addr().unwrap().to_string();
        config.http.public_url = base.clone();
        customize(&mut config);
        config.check().expect("test config is valid");
        let app = Application::build_with_listener(config, listener)
            .await
            .expect("app starts");
        let state = app.state();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            base,
            crm,
            ami,
            state,
            http: reqwest::Client::new(),
            handle,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn client_id(&self) -> String {
        self.state.client_id.expose().to_string()
    }

    /// Waits until pbxgate's AMI link is up (at most 10 s).
    pub async fn ami_connected(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.state.ami.wait_connected())
            .await
            .expect("AMI link up");
    }

    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}
