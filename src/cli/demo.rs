//! `pbxgate demo`: the whole loop on one machine. pbxgate runs unchanged (its AMI client,
//! call model, outbox and CRM client) between two simulated far ends: a simulated Asterisk
//! serving real AMI on 127.0.0.1 ([`asterisk`], replaying the bundled captures with fresh ids
//! and current times, a new call every few seconds, answering click-to-call Originates), and a
//! sandbox CRM on pbxgate's own HTTP server ([`sandbox_crm`], retailCRM's API, keeping what it
//! received). The store and the recordings live in a temporary directory removed at exit.
//!
//! The configuration is the built-in defaults (or `--config`, then `PBXGATE__*`), with the
//! CRM, the AMI, the store, the recordings and the listen address pointed at the demo's own.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::app::{Application, RunError};
use crate::base::secret::Secret;
use crate::config::{Config, ExternalPhone, UserCode};
use crate::demo::{asterisk, sandbox_crm};

/// The dashboard's address when `--listen` is not given (a free port if it is taken).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8088";

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where pbxgate (dashboard, callbacks, sandbox CRM) listens; default 127.0.0.1:8088, or a
    /// free port if that one is taken; `127.0.0.1:0` for any free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A new simulated call this often (e.g. `4s`, `1500ms`).
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = parse_interval)]
    pub every: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(200) || d > Duration::from_secs(3600) {
        return Err("must be between 200ms and 1h".into());
    }
    Ok(d)
}

/// Runs the demo until Ctrl-C / SIGTERM. Exit codes as for `serve`.
pub fn main(config_path: Option<&Path>, args: &DemoArgs) -> ExitCode {
    let base = match config_path {
        Some(p) => Config::read_unchecked(Some(p), std::env::vars()).map(|(c, _)| c),
        None => Config::parse_unchecked("", std::env::vars()),
    };
    let base = match base {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(&base.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(base, args))
}

fn random_token(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len)
        .map(|_| char::from(CHARS[rand::random_range(0..CHARS.len())]))
        .collect()
}

/// `config` pointed at the demo's far ends and temporary directory.
pub fn demo_config(
    mut config: Config,
    http: std::net::SocketAddr,
    ami: std::net::SocketAddr,
    dir: &Path,
) -> Config {
    let public_url = format!("http://{http}");
    config.http.listen = http.to_string();
    config.http.public_url = public_url.clone();
    config.crm.url = format!("{public_url}{}", sandbox_crm::BASE_PATH);
    config.crm.api_key = Secret::new(format!("demo-{}", random_token(24)));
    config.crm.client_id = Secret::new(random_token(32));
    config.crm.register_on_start = true;
    config.ami.host = ami.ip().to_string();
    config.ami.port = ami.port();
    config.ami.secret = Secret::new(random_token(24));
    config.ami.events = "on".into();
    config.storage.path = dir.join("store");
    config.records.dir = dir.join("recordings");
    config.backfill.cdr_csv = Default::default();
    // The simulated recordings are written at once: no need to wait for them to settle.
    config.history.record_settle = config.history.record_settle.min(Duration::from_secs(1));
    if config.users.is_empty() {
        config.users = (1..=3)
            .map(|i| UserCode {
                user_id: i,
                code: format!("10{i}"),
            })
            .collect();
    }
    if config.external_phones.is_empty() {
        config.external_phones = vec![ExternalPhone {
            site: "demo".into(),
            number: "+4930111000".into(),
        }];
    }
    if config.calls.unassigned_code.is_empty() {
        config.calls.unassigned_code = "101".into();
    }
    config
}

async fn run(base: Config, args: &DemoArgs) -> ExitCode {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("pbxgate demo: {what}: {e}");
        ExitCode::from(1)
    };
    let dir = match tempfile::Builder::new().prefix("pbxgate-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => return fail("cannot create a temporary directory", &e),
    };
    let listener = match &args.listen {
        Some(addr) => TcpListener::bind(addr),
        None => TcpListener::bind(DEFAULT_LISTEN).or_else(|_| TcpListener::bind("127.0.0.1:0")),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => return fail("cannot listen", &e),
    };
    let ami_listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => return fail("cannot listen for the simulated Asterisk", &e),
    };
    let (http_addr, ami_addr) = match (listener.local_addr(), ami_listener.local_addr()) {
        (Ok(h), Ok(a)) => (h, a),
        (Err(e), _) | (_, Err(e)) => return fail("cannot read the listen address", &e),
    };
    let config = demo_config(base, http_addr, ami_addr, dir.path());
    if let Err(e) = crate::check::problems(&config) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(&config.records.dir) {
        return fail("cannot create the recordings directory", &e);
    }
    if !sandbox_crm::install(sandbox_crm::SandboxCrm::new(config.crm.api_key.clone())) {
        return fail("the sandbox CRM", &"already running in this process");
    }
    let simulator = match asterisk::Asterisk::start(
        ami_listener,
        asterisk::SimConfig {
            username: config.ami.username.clone(),
            secret: config.ami.secret.clone(),
            records_dir: config.records.dir.clone(),
            interval: args.every,
        },
    ) {
        Ok(s) => s,
        Err(e) => return fail("cannot start the simulated Asterisk", &e),
    };
    let banner = banner(&config, &simulator, args.every, dir.path());
    let app = match Application::build_with_listener(config, listener).await {
        Ok(app) => app,
        Err(e) => return fail("cannot start", &e),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(banner.as_bytes());
    let _ = out.flush();
    drop(out);
    let result = app.run_until_signal().await;
    drop(simulator);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Task { .. }) => ExitCode::from(1),
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::from(1)
        }
    }
}

/// What the demo prints once it runs (stdout; the logs go to stderr).
fn banner(config: &Config, sim: &asterisk::Asterisk, every: Duration, dir: &Path) -> String {
    let url = &config.http.public_url;
    let user = &config.users[0];
    format!(
        "\npbxgate demo: pbxgate between a simulated Asterisk and a sandbox CRM, all on this machine.\n\n\
         \x20 dashboard:      {url}/\n\
         \x20 sandbox CRM:    {url}{received}  (what pbxgate sent to the CRM)\n\
         \x20 simulated AMI:  {ami} (a new call every {every})\n\
         \x20 click-to-call:  curl '{url}{make_call}?clientId={client_id}&code={code}&userId={user_id}&phone=%2B4930555123'\n\
         \x20 store:          {dir} (removed at exit)\n\n\
         Calls ring within seconds and reach the sandbox CRM when they end. Ctrl-C stops the demo.\n\n",
        received = sandbox_crm::RECEIVED_PATH,
        ami = sim.addr,
        every = humantime::format_duration(every),
        make_call = crate::http::paths::MAKE_CALL,
        client_id = config.crm.client_id.expose(),
        code = user.code,
        user_id = user.user_id,
        dir = dir.display(),
    )
}
