//! Startup: opens the store, builds the CRM client, starts the HTTP server on a pre-bound
//! listener and the background tasks; stops them together.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::click_to_call::ClickToCall;
use crate::config::Config;
use crate::crm::registration::{self, RegistrationState, RegistrationStatus};
use crate::crm::CrmFailure;
use crate::http::{self, HttpHandle, HttpServer, Services};
use crate::manager_status::ManagerStatus;
use crate::outbox::{Outbox, Tee};
use crate::pbx::ami::AmiClient;
use crate::phone::PhoneBook;
use crate::pipeline::{CallTracker, RecentCalls, TrackerStats};
use crate::records::Records;
use crate::routing::Router;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crm(#[from] CrmFailure),
    #[error("http server: {0}")]
    Http(std::io::Error),
}

pub struct Application {
    server: HttpServer,
    handle: HttpHandle,
    addr: SocketAddr,
    /// What the server was given; read at shutdown and by the accessors below.
    state: Services,
    tasks: Vec<JoinHandle<()>>,
    /// Exits the process if the store gets stuck; stopped with the application.
    _watchdog: Option<crate::store::watchdog::Watchdog>,
}

impl Application {
    /// Binds `http.listen` and builds the application.
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let listener =
            TcpListener::bind(&config.http.listen).map_err(|source| StartError::Bind {
                addr: config.http.listen.clone(),
                source,
            })?;
        Self::build_with_listener(config, listener).await
    }

    /// Builds the application on an already-bound listener (tests bind 127.0.0.1:0).
    pub async fn build_with_listener(
        config: Config,
        listener: TcpListener,
    ) -> Result<Application, StartError> {
        let open_files = raise_open_files_limit();
        let connections = http::conn::ConnLimits::new(
            fit_connections(config.http.max_connections, open_files),
            config.http.max_connections_per_ip,
        );
        let config = Arc::new(config);
        let addr = listener.local_addr().map_err(StartError::Http)?;
        let store = Store::open(&config.storage.path)?;
        let watchdog = (!config.storage.stall_limit.is_zero()).then(|| {
            let probe_store = store.clone();
            crate::store::watchdog::watch(
                config.storage.stall_limit,
                move || probe_store.probe().map_err(|e| e.to_string()),
                |why| {
                    tracing::error!(%why, "the store is stuck; exiting so that the service is restarted");
                    std::process::exit(70);
                },
            )
        });
        let client_id = store.client_id(&config.crm.client_id).await?;
        let crm = crate::crm::connect(config.clone(), client_id.clone())?;

        let mut tasks = Vec::new();
        let registration = if !crm.is_configured() {
            tracing::warn!("crm.api_key is empty: not talking to retailCRM (set it in the config or PBXGATE__CRM__API_KEY)");
            RegistrationStatus::new(RegistrationState::Disabled("crm.api_key is empty"))
        } else if !config.crm.register_on_start {
            RegistrationStatus::new(RegistrationState::Disabled("crm.register_on_start = false"))
        } else {
            let status = RegistrationStatus::new(RegistrationState::Pending);
            tasks.push(tokio::spawn(registration::register_until_done(
                crm.clone(),
                status.clone(),
            )));
            status
        };

        for warning in crate::check::config_warnings(&config) {
            tracing::warn!("{warning}");
        }
        let ami = AmiClient::start(config.ami.clone());

        // Call tracking: live events to the CRM through a bounded queue, finished calls to the
        // history sink (kept in memory for now).
        let (live_tx, live_rx) = tokio::sync::mpsc::channel(1024);
        let tracker_stats = Arc::new(TrackerStats::default());
        tasks.push(tokio::spawn(crate::pipeline::live::run(
            live_rx,
            crm.clone(),
            store.clone(),
            config.clone(),
            tracker_stats.clone(),
        )));
        let recent_calls = RecentCalls::new(200);
        let records_key = store.records_secret(&config.records.secret).await?;
        let records = Records::new(&config, store.records()?, records_key);
        tasks.push(tokio::spawn(records.clone().run_maintenance()));
        let outbox = Outbox::with_records(
            crate::outbox::store::OutboxStore::of(&store)?,
            store.clone(),
            crm.clone(),
            config.clone(),
            Some(records.clone()),
        );
        tasks.push(tokio::spawn(outbox.clone().run()));
        let sink = Tee(vec![
            Arc::new(outbox.clone()),
            Arc::new(recent_calls.clone()),
        ]);
        let (tracker, tracker_task) = CallTracker::start(
            &config,
            ami.clone(),
            live_tx,
            Arc::new(sink),
            tracker_stats.clone(),
            Some(store.live()?),
            crate::pbx::cdr::CdrRecovery::new(config.clone())
                .map(|r| Arc::new(r) as Arc<dyn crate::pipeline::tracker::Recovery>),
        );
        tasks.push(tracker_task);

        let click_to_call = ClickToCall::new(config.clone(), ami.clone(), Some(tracker.clone()));
        tasks.push(tokio::spawn(click_to_call.clone().log_outcomes()));
        let (manager_status, worker) =
            ManagerStatus::start(config.clone(), store.clone(), ami.clone());
        tasks.push(worker);

        let phones = Arc::new(PhoneBook::new(&config.phone));
        let router = Router::new(config.clone(), crm.clone(), store.clone(), phones);
        router.report_to(tracker.clone());
        let agi_addr = if config.routing.agi_listen.is_empty() {
            None
        } else {
            let bind = |source| StartError::Bind {
                addr: config.routing.agi_listen.clone(),
                source,
            };
            let agi = tokio::net::TcpListener::bind(&config.routing.agi_listen)
                .await
                .map_err(bind)?;
            let agi_addr = agi.local_addr().map_err(bind)?;
            tasks.push(tokio::spawn(crate::pbx::agi::serve(
                agi,
                router.clone(),
                config.routing.agi_timeout,
            )));
            tracing::info!(listen = %agi_addr, "FastAGI routing server started");
            Some(agi_addr)
        };

        let state = Services {
            config: config.clone(),
            store,
            client_id,
            crm,
            registration,
            ami,
            click_to_call,
            manager_status,
            tracker,
            recent_calls,
            outbox,
            router,
            agi_addr,
            records,
            tracker_stats,
            connections,
            open_files,
        };
        let server = HttpServer::start(listener, state.clone()).map_err(StartError::Http)?;
        let handle = server.handle();
        tracing::info!(listen = %addr, public_url = %config.http.public_url, store = %config.storage.path.display(),
            "pbxgate started");
        Ok(Application {
            server,
            handle,
            addr,
            state,
            tasks,
            _watchdog: watchdog,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.state.config
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The clientId retailCRM must present in every callback.
    pub fn client_id(&self) -> &crate::base::secret::Secret {
        &self.state.client_id
    }

    pub fn crm(&self) -> &Arc<dyn crate::crm::Crm> {
        &self.state.crm
    }

    /// The module's registration with the CRM.
    pub fn registration(&self) -> &RegistrationStatus {
        &self.state.registration
    }

    pub fn ami(&self) -> &AmiClient {
        &self.state.ami
    }

    pub fn tracker(&self) -> &CallTracker {
        &self.state.tracker
    }

    pub fn tracker_stats(&self) -> &Arc<TrackerStats> {
        &self.state.tracker_stats
    }

    /// The last finished calls.
    pub fn recent_calls(&self) -> &RecentCalls {
        &self.state.recent_calls
    }

    /// The durable call history and its uploader.
    pub fn outbox(&self) -> &Outbox {
        &self.state.outbox
    }

    pub fn router(&self) -> &Router {
        &self.state.router
    }

    /// Where the FastAGI server listens, when it is on.
    pub fn agi_addr(&self) -> Option<SocketAddr> {
        self.state.agi_addr
    }

    pub fn records(&self) -> &Records {
        &self.state.records
    }

    /// The HTTP connection limits and counts.
    pub fn connections(&self) -> &Arc<http::conn::ConnLimits> {
        &self.state.connections
    }

    /// Stops the server gracefully when awaited (in-flight requests finish).
    pub fn handle(&self) -> HttpHandle {
        self.handle.clone()
    }

    /// Runs until the server is stopped through its handle; then stops the background tasks and
    /// flushes the store.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.run().await;
        self.state.ami.stop();
        for t in &self.tasks {
            t.abort();
        }
        if let Err(e) = self.state.outbox.store().close() {
            tracing::error!(error = %e, "writing the call history's counters failed");
        }
        if let Err(e) = self.state.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        result
    }

    /// Runs until SIGINT/SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        let handle = self.handle();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            handle.stop(true).await;
        });
        self.run_until_stopped().await
    }
}

/// Descriptors kept for everything but client connections: the store, the AMI and CRM links,
/// FastAGI, logs.
const RESERVED_FILES: u64 = 256;

/// Raises the soft limit of open files to the hard limit (the default soft limit, 1024, is soon
/// used up by client connections). Returns the soft limit in force, if it can be read.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "open-files limit raised"
            );
            return Some(raised.rlim_cur);
        }
        tracing::warn!(error = %std::io::Error::last_os_error(), soft = limit.rlim_cur,
            hard = limit.rlim_max, "cannot raise the open-files limit");
    }
    Some(limit.rlim_cur)
}

/// `http.max_connections`, lowered if needed so that connections cannot use up the open-files
/// limit: each may hold two descriptors (its socket and a recording it streams), and
/// [`RESERVED_FILES`] stay for the rest.
pub fn fit_connections(configured: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured;
    };
    let fits = usize::try_from(open_files.saturating_sub(RESERVED_FILES) / 2)
        .unwrap_or(usize::MAX)
        .max(16);
    if fits < configured {
        tracing::warn!(
            configured,
            used = fits,
            open_files,
            "http.max_connections lowered to fit the open-files limit (raise LimitNOFILE / ulimit -n)"
        );
        return fits;
    }
    configured
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soft_and_hard() -> (libc::rlim_t, libc::rlim_t) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        (limit.rlim_cur, limit.rlim_max)
    }

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (_, hard) = soft_and_hard();
        let lowered = libc::rlimit {
            rlim_cur: hard.min(512),
            rlim_max: hard,
        };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(raise_open_files_limit(), Some(hard));
        assert_eq!(soft_and_hard(), (hard, hard));
    }

    #[test]
    fn connections_are_fitted_to_the_open_files_limit() {
        assert_eq!(fit_connections(4096, Some(65536)), 4096);
        assert_eq!(fit_connections(4096, Some(1024)), 384);
        assert_eq!(fit_connections(4096, None), 4096);
        assert_eq!(fit_connections(4096, Some(100)), 16);
        assert_eq!(fit_connections(10, Some(1024)), 10);
    }
}
