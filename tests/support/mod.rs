//! Test support: the fake retailCRM, the scripted AMI peer, and a running pbxgate per test.
#![allow(dead_code, unused_imports)]

pub mod captures;
pub mod fake_ami;
pub mod fake_bitrix24;
pub mod fake_crm;
pub mod fake_kommo;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use pbxgate::app::Application;
use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, ExternalPhone, UserCode};
use pbxgate::crm::registration::RegistrationStatus;
use pbxgate::crm::Crm;
use pbxgate::http::conn::ConnLimits;
use pbxgate::http::HttpHandle;
use pbxgate::outbox::Outbox;
use pbxgate::pbx::ami::AmiClient;
use pbxgate::pipeline::{RecentCalls, TrackerStats};
use pbxgate::records::Records;
use pbxgate::routing::Router;
use pbxgate::store::Store;
use tempfile::TempDir;

pub use fake_ami::FakeAmi;
pub use fake_bitrix24::FakeBitrix24;
pub use fake_crm::{FakeCrm, Fault};
pub use fake_kommo::FakeKommo;

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

/// What tests look at inside the running pbxgate, taken from its accessors at start.
pub struct AppParts {
    pub config: Arc<Config>,
    pub store: Store,
    pub client_id: Secret,
    pub crm: Arc<dyn Crm>,
    pub registration: RegistrationStatus,
    pub ami: AmiClient,
    pub tracker_stats: Arc<TrackerStats>,
    pub recent_calls: RecentCalls,
    pub outbox: Outbox,
    pub router: Router,
    pub agi_addr: Option<SocketAddr>,
    pub records: Records,
    pub connections: Arc<ConnLimits>,
}

impl AppParts {
    fn of(app: &Application) -> AppParts {
        AppParts {
            config: app.config().clone(),
            store: app.store().clone(),
            client_id: app.client_id().clone(),
            crm: app.crm().clone(),
            registration: app.registration().clone(),
            ami: app.ami().clone(),
            tracker_stats: app.tracker_stats().clone(),
            recent_calls: app.recent_calls().clone(),
            outbox: app.outbox().clone(),
            router: app.router().clone(),
            agi_addr: app.agi_addr(),
            records: app.records().clone(),
            connections: app.connections().clone(),
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub crm: FakeCrm,
    pub ami: FakeAmi,
    pub state: AppParts,
    pub http: reqwest::Client,
    handle: HttpHandle,
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
        pbxgate::check::problems(&config).expect("test config is valid");
        let app = Application::build_with_listener(config, listener)
            .await
            .expect("app starts");
        let state = AppParts::of(&app);
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

    /// `GET /ready`'s body.
    pub async fn ready(&self) -> serde_json::Value {
        self.http
            .get(self.url("/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
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

/// A capture's bytes without its banner lines (the session already has one).
pub fn capture_body(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../shared/ami-captures/{name}.raw",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = String::from_utf8(std::fs::read(path).unwrap()).unwrap();
    text.split_inclusive('\n')
        .filter(|l| !l.starts_with("Asterisk Call Manager/"))
        .collect::<String>()
        .into_bytes()
}

/// An app set up like the lab the captures come from (system id `lab`, `from-trunk`), AMI up.
pub async fn lab_app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.calls.inbound_contexts = vec!["from-trunk".into()];
        c.pbx.system_id = "lab".into();
        tweak(c);
    })
    .await;
    app.ami_connected().await;
    // The tracker resyncs at every login: once its CoreShowChannels is answered (the scripted
    // server answers before it sends what a test gives it next), the calls a test sends are
    // not taken for calls that the answer says are gone.
    app.ami.wait_for_actions("CoreShowChannels", 1).await;
    app
}

/// Waits until `n` calls finished in total (at most 15 s); returns the recent calls.
pub async fn finished(app: &TestApp, n: u64) -> Vec<pbxgate::calls::CallRecord> {
    tokio::time::timeout(Duration::from_secs(15), app.state.recent_calls.wait_for(n))
        .await
        .expect("calls finished");
    app.state.recent_calls.all()
}

/// 2026-11-21 10:00:00 UTC.
pub const T0: i64 = 1_795_255_200_000;

/// An answered inbound call record (customer +79991234567 on +74951234567, extension 101, 5 s
/// waiting, 60 s talking) starting at `start`.
pub fn call_record(id: &str, start: i64) -> pbxgate::calls::CallRecord {
    pbxgate::calls::CallRecord {
        did: Some("+74951234567".into()),
        external_phone: Some("+74951234567".into()),
        start,
        answer: Some(start + 5_000),
        end: start + 65_000,
        ..pbxgate::calls::CallRecord::sample(id)
    }
}
