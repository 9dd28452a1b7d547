//! The HTTP server: the CRMs' callbacks (retailCRM's, Bitrix24's events), the PBX's endpoints,
//! health/readiness, the admin page and its assets.

pub(crate) mod admin;
pub(crate) mod bitrix24;
pub(crate) mod callbacks;
pub(crate) mod callgate;
pub mod conn;
pub(crate) mod error;
pub(crate) mod kommo;
pub(crate) mod params;
pub(crate) mod pbx;
pub(crate) mod records;
pub(crate) mod sandbox;
pub(crate) mod status;

use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::error::DispatchError;
use actix_http::HttpService;
use actix_service::{map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{
    fn_service, AppConfig, Extensions, Server, ServerHandle, Service, ServiceFactory,
    ServiceRequest, ServiceResponse,
};
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlers;
use actix_web::rt::net::TcpStream;
use actix_web::{web, App, ResponseError};

use crate::base::secret::Secret;
use crate::click_to_call::ClickToCall;
use crate::config::Config;
use crate::crm::registration::RegistrationStatus;
use crate::crm::Crm;
use crate::manager_status::ManagerStatus;
use crate::outbox::Outbox;
use crate::pbx::ami::AmiClient;
use crate::pipeline::{CallTracker, RecentCalls, TrackerStats};
use crate::records::Records;
use crate::routing::Router;
use crate::store::Store;
pub use error::ApiError;

/// How long a connection may wait for its next request.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Paths we serve; the registration builds retailCRM's URLs from the same constants.
pub mod paths {
    pub use crate::crm::retailcrm::paths::{ACTIVITY, LOGO, MAKE_CALL, USER_STATUS};
    pub const HEALTH: &str = "/health";
    pub const READY: &str = "/ready";
    /// Prometheus metrics (text format).
    pub const METRICS: &str = "/metrics";
    /// Call events posted by a PBX (Bearer `pbx.token`).
    pub const PBX_EVENTS: &str = "/pbx/events";
    /// The routing lookup for the dialplan (`pbx.token` as Bearer or `token=`).
    pub const PBX_ROUTE: &str = "/pbx/route";
    /// What the Bitrix24 portal posts (click-to-call, callbacks).
    pub const BITRIX24_EVENTS: &str = "/bitrix24/events";
    /// Recordings: `/records/{token}.{ext}` (see [`crate::records`]).
    pub const RECORDING: &str = "/records/{name}";
}

/// The services the application built, handed to the server once at start.
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    pub store: Store,
    /// The clientId retailCRM must present in every callback.
    pub client_id: Secret,
    pub crm: Arc<dyn Crm>,
    pub registration: RegistrationStatus,
    pub ami: AmiClient,
    pub click_to_call: ClickToCall,
    pub manager_status: ManagerStatus,
    pub tracker: CallTracker,
    /// The last finished calls (until the history outbox takes them).
    pub recent_calls: RecentCalls,
    /// The durable call history and its uploader.
    pub outbox: Outbox,
    /// Incoming-call routing (`/pbx/route`, FastAGI).
    pub router: Router,
    /// Where the FastAGI server listens, when it is on.
    pub agi_addr: Option<std::net::SocketAddr>,
    /// Recording links and the files behind them.
    pub records: Records,
    pub tracker_stats: Arc<TrackerStats>,
    /// The customisation hooks (their counts, for `/ready`).
    pub hooks: crate::hooks::Hooks,
    /// How many client connections may be open, and are.
    pub connections: Arc<conn::ConnLimits>,
    /// The soft open-files limit in force (raised to the hard limit at start).
    pub open_files: Option<u64>,
    /// What is counted for `/metrics` alone (finished calls, recording bytes).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Everything a handler may need; shared by all workers. Only the handlers read it (nothing
/// outside `http` can get one).
pub struct AppState {
    services: Services,
    started: Instant,
    /// The dashboard's open live-update streams.
    admin_streams: admin::Streams,
    /// The CallGate-compatible API (`/rest/...`).
    callgate: crate::callgate::CallGate,
    /// The Kommo widget's stream tickets and open streams.
    kommo: kommo::WidgetState,
}

impl AppState {
    fn new(services: Services) -> AppState {
        let callgate = crate::callgate::CallGate::new(
            crate::callgate::Parts {
                config: services.config.clone(),
                tracker: services.tracker.clone(),
                router: services.router.clone(),
                crm: services.crm.clone(),
                outbox: services.outbox.clone(),
            },
            services.click_to_call.clone(),
        );
        AppState {
            callgate,
            services,
            started: Instant::now(),
            admin_streams: admin::Streams::default(),
            kommo: kommo::WidgetState::default(),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.services
    }
}

/// The running HTTP server, as the application sees it: started on a bound listener, run until
/// stopped through its handle.
pub struct HttpServer {
    server: Server,
}

/// Stops the server from anywhere (cheap to clone).
#[derive(Clone)]
pub struct HttpHandle(ServerHandle);

impl HttpServer {
    /// Builds the server on an already-bound listener (port 0 in tests). [`HttpServer::run`]
    /// must be awaited (or spawned) for it to serve.
    pub fn start(listener: TcpListener, services: Services) -> std::io::Result<HttpServer> {
        let server = server(listener, web::Data::new(AppState::new(services)))?;
        Ok(HttpServer { server })
    }

    pub fn handle(&self) -> HttpHandle {
        HttpHandle(self.server.handle())
    }

    /// Serves until stopped through a handle.
    pub async fn run(self) -> std::io::Result<()> {
        self.server.await
    }
}

impl HttpHandle {
    /// Stops accepting connections; `graceful`: in-flight requests finish first. Returns once
    /// the server has stopped.
    pub async fn stop(&self, graceful: bool) {
        self.0.stop(graceful).await
    }
}

/// Builds the server on an already-bound listener (port 0 in tests). The returned future must
/// be awaited or spawned; stop it through its handle.
///
/// Built from actix's parts rather than `HttpServer` so that every connection goes through
/// [`conn::Guarded`]: the connection limits, and the time limits on heads after the first one
/// and on bodies nobody reads (see [`conn`]).
fn server(listener: TcpListener, state: web::Data<AppState>) -> std::io::Result<Server> {
    let addr = listener.local_addr()?;
    let client_timeout = state.config.http.client_timeout;
    let limits = state.connections.clone();
    let builder = Server::build();
    let shutdown = builder.graceful_shutdown_signal();
    let server = builder
        .disable_signals()
        .shutdown_timeout(5)
        .listen("pbxgate-http", listener, move || {
            let limits = limits.clone();
            let shutdown = shutdown.clone();
            let app = app(state.clone())
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response());
            let h1 = HttpService::build()
                .keep_alive(KEEP_ALIVE)
                .client_request_timeout(client_timeout)
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                // One recording chunk per write: the write buffer then holds one chunk, not two
                // (a third less memory per streaming connection, same throughput; other answers
                // are small).
                .h1_write_buffer_size(crate::http::records::CHUNK)
                .graceful_shutdown_signal(move || {
                    let shutdown = shutdown.clone();
                    async move { shutdown.notified().await }
                })
                .on_connect_ext(|io: &conn::Guarded, ext: &mut Extensions| {
                    ext.insert(io.conn());
                })
                .h1(map_config(app, |_| AppConfig::default()));
            fn_service(move |io: TcpStream| {
                let admitted = conn::Guarded::admit(io, &limits, client_timeout, KEEP_ALIVE);
                std::future::ready(admitted.ok_or_else(|| {
                    DispatchError::Io(std::io::Error::other("connection limit reached"))
                }))
            })
            .and_then(h1)
        })?
        .run();
    Ok(server)
}

/// The application: routes, limits, error bodies, request logs, connection bookkeeping.
fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<conn::Tracked>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max_body = state.config.http.max_body_bytes;
    let body_timeout = state.config.http.client_timeout;
    App::new()
        .app_data(state.clone())
        .app_data(web::PayloadConfig::new(max_body))
        .app_data(web::FormConfig::default().limit(max_body))
        .app_data(web::JsonConfig::default().limit(max_body))
        .wrap(
            ErrorHandlers::new()
                .default_handler_client(error::json_error_body)
                .handler(StatusCode::INTERNAL_SERVER_ERROR, error::json_error_body),
        )
        .wrap_fn(move |mut req, srv| {
            // The body must follow its head within http.client_timeout.
            let late = conn::limit_body(&mut req, body_timeout);
            let fut = srv.call(req);
            async move {
                let res = fut.await?.map_into_boxed_body();
                if !late.get() {
                    return Ok(res);
                }
                let (req, _) = res.into_parts();
                let late = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within {}",
                        humantime::format_duration(body_timeout)
                    ),
                );
                Ok(ServiceResponse::new(req, late.error_response()))
            }
        })
        .wrap_fn(|req, srv| {
            // Log the path only: query strings carry the clientId and customers' numbers.
            let method = req.method().clone();
            let path = loggable_path(req.path());
            let started = Instant::now();
            let fut = srv.call(req);
            async move {
                let res = fut.await?;
                let status = res.status().as_u16();
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                // One line per request; a refused or failed one says why.
                let reason =
                    res.response()
                        .error()
                        .map(|e| match e.as_error::<error::ApiError>() {
                            Some(api) => crate::telemetry::one_line(&api.message, 500),
                            None => crate::telemetry::one_line(&e.to_string(), 500),
                        });
                if res.status().is_server_error() {
                    tracing::error!(%method, path, status, ms, reason, "http request");
                } else if path == paths::HEALTH
                    || path == paths::READY
                    || path == paths::METRICS
                    || path == paths::PBX_ROUTE
                {
                    // Polled, or asked on every inbound call within its deadline (counted in
                    // /ready): not a line each at the default level.
                    tracing::debug!(%method, path, status, ms, reason, "http request");
                } else {
                    tracing::info!(%method, path, status, ms, reason, "http request");
                }
                Ok(res)
            }
        })
        .wrap_fn(|req, srv| {
            // The connection has a request in flight until its answer is sent.
            let in_flight = req.conn_data::<Rc<conn::Conn>>().map(conn::Conn::start);
            let fut = srv.call(req);
            async move {
                let res = fut.await?;
                Ok(res.map_body(|_, body| conn::Tracked::new(body, in_flight)))
            }
        })
        .configure(routes)
        .configure(sandbox::routes)
}

/// A recording link's token is a credential: only its first characters are logged. So is a
/// CallGate `ukey` after `/rest/telephony_predial/&`: nothing after the `&` is.
fn loggable_path(path: &str) -> String {
    if let Some(at) = path.find('&').filter(|_| path.starts_with("/rest/")) {
        return format!("{}&…", &path[..at]);
    }
    match path.strip_prefix(crate::records::PATH_PREFIX) {
        Some(token) if token.len() > 8 => {
            let cut = token.char_indices().nth(8).map_or(token.len(), |(i, _)| i);
            format!("{}{}…", crate::records::PATH_PREFIX, &token[..cut])
        }
        _ => path.to_owned(),
    }
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(status::admin_page)))
        .service(web::resource(paths::LOGO).route(web::get().to(status::logo)))
        .service(web::resource(paths::HEALTH).route(web::get().to(status::health)))
        .service(web::resource(paths::READY).route(web::get().to(status::ready)))
        .service(web::resource(paths::METRICS).route(web::get().to(status::metrics)))
        .service(
            web::resource(paths::MAKE_CALL)
                .route(web::get().to(callbacks::make_call))
                .route(web::post().to(callbacks::make_call)),
        )
        .service(
            web::resource(paths::USER_STATUS)
                .route(web::get().to(callbacks::user_status))
                .route(web::post().to(callbacks::user_status)),
        )
        .service(web::resource(paths::ACTIVITY).route(web::post().to(callbacks::activity)))
        .service(web::resource(paths::PBX_EVENTS).route(web::post().to(pbx::events)))
        .service(
            web::resource(paths::BITRIX24_EVENTS)
                .app_data(web::PayloadConfig::new(bitrix24::MAX_BODY))
                .route(web::post().to(bitrix24::events)),
        )
        .service(web::resource(paths::PBX_ROUTE).route(web::get().to(pbx::route)))
        .service(
            web::resource(paths::RECORDING)
                .route(web::get().to(crate::http::records::recording))
                .route(web::head().to(crate::http::records::recording)),
        )
        .configure(admin::routes)
        .configure(kommo::routes)
        .configure(callgate::routes);
}

#[cfg(test)]
mod tests {
    #[test]
    fn recording_tokens_are_cut_in_logs() {
        let token = "A".repeat(75);
        assert_eq!(
            super::loggable_path(&format!("/records/{token}.mp3")),
            "/records/AAAAAAAA…"
        );
        assert_eq!(super::loggable_path("/crm/make-call"), "/crm/make-call");
        assert_eq!(
            super::loggable_path("/rest/telephony_predial/&ukey=secret&internal_phone=101"),
            "/rest/telephony_predial/&…"
        );
    }
}
