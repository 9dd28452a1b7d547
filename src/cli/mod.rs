//! Command line: `pbxgate [--config PATH] [serve|register|check]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::Application;
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
    Check,
    /// Inspect and repair the call-history queue (stop the service first: one process owns the store).
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Queue past calls from Asterisk's CDR CSV (cdr-csv/Master.csv) for upload.
    Backfill(crate::pbx::cdr::BackfillArgs),
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Counts per state and the age of the oldest pending call.
    Stats {
        /// Count every record again instead of trusting the kept counters (after a crash).
        #[arg(long)]
        recount: bool,
    },
    /// Records in a state (dead: with the CRM's reason).
    List {
        #[arg(long, value_parser = ["dead", "pending"], default_value = "dead")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead records back to pending (one by externalId, or all).
    Retry {
        #[arg(
            long,
            conflicts_with = "all_dead",
            required_unless_present = "all_dead"
        )]
        id: Option<String>,
        #[arg(long)]
        all_dead: bool,
    },
}

/// Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
            Command::Check => {
                let ok = crate::check::run(&config, &origin, &mut std::io::stdout()).await;
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Command::Outbox { command } => outbox(&config, command).await,
            Command::Backfill(args) => crate::pbx::cdr::run(&config, &args).await,
        }
    })
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
pub(crate) fn open_store_for_cli(config: &Config) -> Result<Store, ExitCode> {
    match Store::open(&config.storage.path) {
        Ok(s) => Ok(s),
        Err(crate::store::StoreError::Locked { path }) => {
            eprintln!(
                "pbxgate: the store {} is held by a running pbxgate (sled allows one process).\n\
                 Stop the service first; while it runs, GET /ready shows the queue (\"history\").",
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

async fn outbox(config: &Config, command: OutboxCommand) -> ExitCode {
    let store = match open_store_for_cli(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let queue = match crate::outbox::store::OutboxStore::of(&store) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(1);
        }
    };
    let now = crate::base::clock::now_ms();
    let result: Result<(), crate::store::StoreError> = (|| {
        match command {
            OutboxCommand::Stats { recount } => {
                if recount {
                    queue.recount()?;
                }
                let c = queue.counts();
                let oldest = queue.oldest_pending()?.map(|t| (now - t) / 1000);
                println!(
                    "pending  {}",
                    c.pending.load(std::sync::atomic::Ordering::Relaxed)
                );
                println!(
                    "dead     {}",
                    c.dead.load(std::sync::atomic::Ordering::Relaxed)
                );
                println!(
                    "done     {}",
                    c.done.load(std::sync::atomic::Ordering::Relaxed)
                );
                match oldest {
                    Some(s) => println!("oldest pending: {s} s ago"),
                    None => println!("oldest pending: -"),
                }
            }
            OutboxCommand::List { state, limit } => {
                let items = if state == "dead" {
                    queue.dead(limit)?
                } else {
                    queue.list_pending(limit)?
                };
                for e in items {
                    let r = &e.record;
                    println!(
                        "{}\t{:?}\t{}\t{:?}\tattempts={}\t{}",
                        e.id,
                        r.direction,
                        r.customer_number,
                        r.outcome,
                        e.attempts,
                        e.last_error.as_deref().unwrap_or("")
                    );
                }
            }
            OutboxCommand::Retry { id, all_dead } => {
                let n = queue.retry(if all_dead { None } else { id.as_deref() })?;
                println!("{n} record(s) moved back to pending");
            }
        }
        Ok(())
    })();
    let closed = queue.close();
    let flushed = queue.flush().await;
    match result.and(closed).and(flushed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            ExitCode::from(1)
        }
    }
}
