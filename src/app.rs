//! Startup: opens the store, builds the CRM client, starts the HTTP server on a pre-bound
//! listener and the background tasks; supervises them and stops them together, in order.
//!
//! Every long-running task is kept with its name. One that panics, or ends while it should run
//! (all but the registration, which ends once done), is logged and stops the service with an
//! error naming it, so that systemd restarts it.
//!
//! Shutdown (a signal, the server's handle, or a failed task) goes the way the data flows, each
//! step bounded by [`STEP_LIMIT`] so that a stuck one cannot hang the exit (what was cut short
//! is logged): the HTTP server stops accepting and finishes its requests; the inputs stop (the
//! AMI client, FastAGI, the workers that act on the PBX); the call tracker handles what the AMI
//! client had read and finishes the calls that hung up, so that they reach the outbox queue;
//! the live-event sender sends what it was given; the outbox's uploader returns after the batch
//! in flight; then the outbox's counters are written and the store is flushed.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

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

/// Why the service stopped other than by request.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    #[error("background task {task} {how}")]
    Task { task: &'static str, how: String },
}

/// The most each shutdown step may take.
pub const STEP_LIMIT: Duration = Duration::from_secs(3);

/// The background tasks' names (in logs and in [`RunError::Task`]).
mod task {
    pub const REGISTRATION: &str = "registration";
    pub const AMI: &str = "AMI client";
    pub const LIVE: &str = "live call events";
    pub const RECORDS: &str = "recordings maintenance";
    pub const OUTBOX: &str = "call history upload";
    pub const TRACKER: &str = "call tracker";
    pub const CLICK_TO_CALL: &str = "click-to-call outcomes";
    pub const MANAGER_STATUS: &str = "manager statuses";
    pub const AGI: &str = "FastAGI server";
}

/// A background task with its name.
struct Supervised {
    name: &'static str,
    handle: JoinHandle<()>,
    /// Ends by itself once its work is done: not a failure.
    may_end: bool,
}

/// The background tasks still running.
#[derive(Default)]
struct Tasks(Vec<Supervised>);

impl Tasks {
    fn add(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.0.push(Supervised {
            name,
            handle,
            may_end: false,
        });
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.add(name, tokio::spawn(task));
    }

    /// A task that ends once its work is done.
    fn spawn_finite(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.0.push(Supervised {
            name,
            handle: tokio::spawn(task),
            may_end: true,
        });
    }

    fn take(&mut self, name: &str) -> Option<JoinHandle<()>> {
        let i = self.0.iter().position(|t| t.name == name)?;
        Some(self.0.swap_remove(i).handle)
    }

    /// Waits for a task to fail: to panic, or to end while it should run (never returns if
    /// none does). Tasks that may end and did are forgotten.
    async fn failure(&mut self) -> RunError {
        loop {
            let (i, result) = std::future::poll_fn(|cx| {
                for (i, t) in self.0.iter_mut().enumerate() {
                    if let Poll::Ready(r) = Pin::new(&mut t.handle).poll(cx) {
                        return Poll::Ready((i, r));
                    }
                }
                Poll::Pending
            })
            .await;
            let t = self.0.swap_remove(i);
            let how = match result {
                Ok(()) if t.may_end => {
                    tracing::debug!(task = t.name, "background task done");
                    continue;
                }
                Ok(()) => "ended while it should run".to_string(),
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("panicked: {message}")
                }
                Err(e) => format!("stopped: {e}"),
            };
            tracing::error!(task = t.name, error = %how, "a background task failed; stopping the service");
            return RunError::Task { task: t.name, how };
        }
    }

    /// Waits (at most [`STEP_LIMIT`]) for the task `name` to end by itself; aborts it if not.
    async fn finish(&mut self, name: &'static str, what: &str) {
        let Some(mut handle) = self.take(name) else {
            return;
        };
        match tokio::time::timeout(STEP_LIMIT, &mut handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(task = name, error = %e, "background task failed while stopping")
            }
            Err(_) => {
                handle.abort();
                tracing::warn!(
                    task = name,
                    limit_s = STEP_LIMIT.as_secs(),
                    "shutdown step cut short: {what}"
                );
            }
        }
    }

    /// Stops the task `name` where it is (tasks that hold nothing to save).
    fn abort(&mut self, name: &str) {
        if let Some(handle) = self.take(name) {
            handle.abort();
        }
    }
}

pub struct Application {
    server: HttpServer,
    handle: HttpHandle,
    addr: SocketAddr,
    /// What the server was given; read at shutdown and by the accessors below.
    state: Services,
    tasks: Tasks,
    /// Tells the tasks that wait for work to return (the outbox's uploader).
    stopping: tokio::sync::watch::Sender<bool>,
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
        let hooks = crate::hooks::Hooks::new(&config.hooks, reqwest::Client::new());
        let crm = crate::crm::connect(
            config.clone(),
            client_id.clone(),
            Some(store.crm_state()?),
            hooks.clone(),
        )?;

        let mut tasks = Tasks::default();
        let stopping = tokio::sync::watch::Sender::new(false);
        let registration = if !crm.is_configured() {
            tracing::warn!(
                "{}: not talking to {} (set it in the config or as a PBXGATE__ variable)",
                crm.unconfigured(),
                crm.name()
            );
            RegistrationStatus::new(RegistrationState::Disabled(crm.unconfigured()))
        } else if !config.crm.register_on_start {
            RegistrationStatus::new(RegistrationState::Disabled("crm.register_on_start = false"))
        } else {
            let status = RegistrationStatus::new(RegistrationState::Pending);
            tasks.spawn_finite(
                task::REGISTRATION,
                registration::register_until_done(crm.clone(), status.clone()),
            );
            status
        };

        if let crate::admin::Access::Refused(why) =
            crate::admin::access(&config.http.listen, &config.admin.token)
        {
            tracing::warn!("{why}");
        }
        for warning in crate::check::config_warnings(&config) {
            tracing::warn!("{warning}");
        }
        let (ami, ami_task) = AmiClient::start_supervised(config.ami.clone());
        tasks.add(task::AMI, ami_task);

        // Call tracking: live events to the CRM through a bounded queue, finished calls to the
        // history sink (kept in memory for now).
        let (live_tx, live_rx) = tokio::sync::mpsc::channel(1024);
        // What `need_registration` answered, shared by the live path and the history.
        let verdicts = crate::pipeline::registration_points::Verdicts::default();
        let tracker_stats = Arc::new(TrackerStats::default());
        tasks.spawn(
            task::LIVE,
            crate::pipeline::live::run(
                live_rx,
                crm.clone(),
                store.clone(),
                config.clone(),
                tracker_stats.clone(),
                Some(crate::pipeline::live::LiveHooks {
                    hooks: hooks.clone(),
                    verdicts: verdicts.clone(),
                    phones: PhoneBook::new(&config.phone),
                }),
            ),
        );
        let recent_calls = RecentCalls::new(500);
        let records_key = store.records_secret(&config.records.secret).await?;
        let records = Records::with_hooks(&config, store.records()?, records_key, hooks.clone());
        tasks.spawn(task::RECORDS, records.clone().run_maintenance());
        let outbox = Outbox::with_records(
            crate::outbox::store::OutboxStore::of(&store)?,
            store.clone(),
            crm.clone(),
            config.clone(),
            Some(records.clone()),
            hooks.clone(),
            verdicts.clone(),
        );
        let mut stop = stopping.subscribe();
        tasks.spawn(
            task::OUTBOX,
            outbox.clone().run_until(async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
        );
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let sink = verdicts.sink(Arc::new(Tee(vec![
            Arc::new(outbox.clone()),
            Arc::new(recent_calls.clone()),
            metrics.clone(),
        ])));
        let (tracker, tracker_task) = CallTracker::start(
            &config,
            ami.clone(),
            live_tx,
            Arc::new(sink),
            tracker_stats.clone(),
            Some(store.live()?),
            crate::pipeline::recovery::CdrRecovery::new(config.clone())
                .map(|r| Arc::new(r) as Arc<dyn crate::pipeline::tracker::Recovery>),
        );
        tasks.add(task::TRACKER, tracker_task);

        let click_to_call = ClickToCall::new(
            config.clone(),
            ami.clone(),
            Some(tracker.clone()),
            hooks.clone(),
        );
        tasks.spawn(task::CLICK_TO_CALL, click_to_call.clone().log_outcomes());
        let (manager_status, worker) =
            ManagerStatus::start(config.clone(), store.clone(), ami.clone());
        tasks.add(task::MANAGER_STATUS, worker);

        let phones = Arc::new(PhoneBook::new(&config.phone));
        let router = Router::new(
            config.clone(),
            crm.clone(),
            store.clone(),
            phones,
            hooks.clone(),
        );
        router.report_to(Arc::new(tracker.clone()));
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
            tasks.spawn(
                task::AGI,
                crate::pbx::agi::serve(agi, router.clone(), config.routing.agi_timeout),
            );
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
            hooks,
            connections,
            open_files,
            metrics,
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
            stopping,
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

    /// Runs until the server is stopped through its handle, or a background task fails; then
    /// shuts down in order (see the module's note). `Err` names the task that failed.
    pub async fn run_until_stopped(self) -> Result<(), RunError> {
        let Application {
            server,
            handle,
            state,
            mut tasks,
            stopping,
            _watchdog,
            ..
        } = self;
        let mut server = Box::pin(server.run());
        let (served, failed) = tokio::select! {
            served = &mut server => (served, None),
            failed = tasks.failure() => {
                // Stop taking requests; those in flight finish (the server bounds it too).
                let stop = handle.stop(true);
                let served = match tokio::time::timeout(STEP_LIMIT + Duration::from_secs(3), async {
                    stop.await;
                    server.await
                })
                .await
                {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!("shutdown step cut short: HTTP requests in flight");
                        Ok(())
                    }
                };
                (served, Some(failed))
            }
        };
        tracing::info!("stopping");
        // Between batches, the uploader returns; what is pending stays queued.
        state.outbox.stop_after_batch();
        stopping.send_replace(true);
        // Inputs: nothing new reaches the call models.
        state.ami.stop();
        for name in [
            task::AGI,
            task::CLICK_TO_CALL,
            task::MANAGER_STATUS,
            task::REGISTRATION,
        ] {
            tasks.abort(name);
        }
        tasks.finish(task::AMI, "the AMI client did not stop").await;
        // The tracker handles the events read so far and hands the calls that hung up on.
        tasks
            .finish(
                task::TRACKER,
                "calls that hung up last may not be stored (those in the journal resume at the next start)",
            )
            .await;
        tasks
            .finish(task::LIVE, "live call events not sent to the CRM")
            .await;
        tasks
            .finish(
                task::OUTBOX,
                "the call history upload in flight was stopped (the calls stay queued)",
            )
            .await;
        for t in std::mem::take(&mut tasks.0) {
            t.handle.abort();
        }
        if let Err(e) = state.outbox.store().close() {
            tracing::error!(error = %e, "writing the call history's counters failed");
        }
        match tokio::time::timeout(STEP_LIMIT, state.store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final store flush failed"),
            Err(_) => tracing::warn!(
                limit_s = STEP_LIMIT.as_secs(),
                "shutdown step cut short: the final store flush"
            ),
        }
        tracing::info!("stopped");
        match failed {
            Some(failed) => Err(failed),
            None => served.map_err(RunError::Http),
        }
    }

    /// Runs until SIGINT/SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<(), RunError> {
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

    #[tokio::test]
    async fn a_task_that_panics_or_ends_is_a_failure_named_after_it_and_a_finished_one_is_not() {
        let mut tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("waits", std::future::pending());
        // The finite task has ended before the other can panic: it is forgotten, then the
        // panic is reported.
        tasks.spawn_finite("done", async move {
            let _ = tx.send(());
        });
        tasks.spawn("panics", async move {
            let _ = rx.await;
            panic!("boom");
        });
        match tasks.failure().await {
            RunError::Task { task, how } => {
                assert_eq!((task, how.as_str()), ("panics", "panicked: boom"))
            }
            other => panic!("{other}"),
        }
        assert_eq!(tasks.0.len(), 1);
        tasks.spawn("ends", async {});
        match tasks.failure().await {
            RunError::Task { task, how } => {
                assert_eq!((task, how.as_str()), ("ends", "ended while it should run"))
            }
            other => panic!("{other}"),
        }
        assert_eq!(
            tasks.0.iter().map(|t| t.name).collect::<Vec<_>>(),
            ["waits"]
        );
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
