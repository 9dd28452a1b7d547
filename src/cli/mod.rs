//! Command line: `pbxgate [--config PATH] [serve|register|check|outbox|backfill|hooks|bitrix24|kommo]`.
//! Only `main.rs` uses it; the operator commands that own a module are `outbox`, `backfill`,
//! `hooks`, `bitrix24` and `kommo`.

mod backfill;
mod bitrix24;
mod demo;
mod hooks;
mod kommo;
pub(crate) mod kommo_widget;
mod outbox;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{Application, RunError};
use crate::config::Config;
use crate::crm::retailcrm::CrmClient;
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "pbxgate",
    version,
    about = "Asterisk ↔ retailCRM telephony connector"
)]
pub struct Cli {
    /// Configuration file (default: ./config.toml if present, else built-in defaults).
    #[arg(long, short, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Register (or update) the integration module in retailCRM, then exit.
    Register,
    /// Check the config, the store, the CRM key and the AMI login; exit non-zero on any failure.
    /// Through the running service's admin API when one runs.
    Check {
        /// Do not look for a running service: open the store.
        #[arg(long)]
        offline: bool,
    },
    /// Inspect and repair the call-history queue (through the running service's admin API when
    /// one runs, else on the store).
    Outbox {
        /// Do not look for a running service: open the store.
        #[arg(long, global = true)]
        offline: bool,
        #[command(subcommand)]
        command: outbox::OutboxCommand,
    },
    /// Queue past calls from Asterisk's CDR CSV (cdr-csv/Master.csv) for upload.
    Backfill(backfill::BackfillArgs),
    /// Develop a customisation hook: run it on a stored or replayed call.
    Hooks {
        #[command(subcommand)]
        command: hooks::HooksCommand,
    },
    /// Try it on one machine: a simulated Asterisk and a sandbox CRM, a temporary store.
    Demo(demo::DemoArgs),
    /// Bitrix24: authorise pbxgate as the portal's local application (OAuth).
    Bitrix24 {
        #[command(subcommand)]
        command: bitrix24::Bitrix24Command,
    },
    /// Kommo: authorise pbxgate as an OAuth integration; write the widget's archive.
    Kommo {
        #[command(subcommand)]
        command: kommo::KommoCommand,
    },
}

/// Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Demo(args)) = &cli.command {
        // Its own configuration: the built-in defaults unless --config is given.
        return demo::main(cli.config.as_deref(), args);
    }
    let (config, origin) = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(&config.log);

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
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                tracing::info!(config = %origin, "loading");
                match Application::build(config).await {
                    Ok(app) => match app.run_until_signal().await {
                        Ok(()) => ExitCode::SUCCESS,
                        // Logged with the task's name when it failed.
                        Err(RunError::Task { .. }) => ExitCode::from(1),
                        Err(e) => {
                            tracing::error!(error = %e, "server failed");
                            ExitCode::from(1)
                        }
                    },
                    Err(e) => {
                        eprintln!("pbxgate: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Register => register(&config).await,
            Command::Check { offline } => check(&config, &origin, offline).await,
            Command::Outbox { offline, command } => outbox::run(&config, command, offline).await,
            Command::Backfill(args) => backfill::run(&config, &args).await,
            Command::Hooks { command } => hooks::run(&config, command).await,
            Command::Bitrix24 { command } => bitrix24::run(&config, command).await,
            Command::Kommo { command } => kommo::run(&config, command).await,
            // Started above, before any configuration is loaded.
            Command::Demo(_) => ExitCode::SUCCESS,
        }
    })
}

/// `pbxgate check`: through the running service when one runs, else here.
async fn check(config: &Config, origin: &crate::config::Origin, offline: bool) -> ExitCode {
    let ok = if offline {
        crate::check::run(config, origin, &mut std::io::stdout()).await
    } else {
        match service::find(config).await {
            Ok(service::Found::Running(s)) => {
                eprintln!(
                    "pbxgate: checking through the running service at {}",
                    s.base
                );
                match service::check(&s, &mut std::io::stdout()).await {
                    Ok(ok) => ok,
                    Err(e) => {
                        eprintln!("pbxgate: {e}");
                        false
                    }
                }
            }
            Ok(service::Found::NotRunning(_)) => {
                crate::check::run(config, origin, &mut std::io::stdout()).await
            }
            Err(code) => return code,
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn register(config: &Config) -> ExitCode {
    let result = async {
        let crm = CrmClient::new(&config.crm)?;
        if !crm.is_configured() {
            return Err(crate::crm::retailcrm::CrmError::NotConfigured.into());
        }
        let store = Store::open(&config.storage.path)?;
        let client_id = store.client_id(&config.crm.client_id).await?;
        let info = crate::crm::retailcrm::registration::register(&crm, config, &client_id).await?;
        Ok::<_, Box<dyn std::error::Error>>(info)
    }
    .await;
    match result {
        Ok(info) => {
            println!(
                "registered module {} at {}",
                config.crm.module_code, config.crm.url
            );
            if !info.not_exist_users_ids.is_empty() {
                println!(
                    "warning: unknown CRM user ids: {:?}",
                    info.not_exist_users_ids
                );
            }
            if !info.not_exist_site_codes.is_empty() {
                println!(
                    "warning: unknown shop codes: {:?}",
                    info.not_exist_site_codes
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("registration failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Opens the store for an operator command, or explains why it cannot.
fn open_store_for_cli(config: &Config) -> Result<Store, ExitCode> {
    match Store::open(&config.storage.path) {
        Ok(s) => Ok(s),
        Err(crate::store::StoreError::Locked { path }) => {
            eprintln!(
                "pbxgate: the store {} is held by a running pbxgate (sled allows one process).\n\
                 Stop the service first, or let `pbxgate outbox` and `pbxgate check` reach its \
                 admin API at http.listen (with admin.token).",
                path.display()
            );
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("pbxgate: {e}");
            Err(ExitCode::from(1))
        }
    }
}
