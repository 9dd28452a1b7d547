//! `pbxgate outbox ...`: the operator's view of the call-history queue: counts, the records in
//! a state, moving dead records back to pending. Through the running service's admin API when
//! one runs (one process owns the store), else on the store itself.

use std::process::ExitCode;

use clap::Subcommand;

use serde_json::Value;

use super::service::{Found, Service};
use crate::calls::{Direction, Outcome};
use crate::config::Config;

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

/// Runs one `pbxgate outbox` command through the running service, or against the store when
/// none runs (or `offline`).
pub async fn run(config: &Config, command: OutboxCommand, offline: bool) -> ExitCode {
    let why = if offline {
        None
    } else {
        match super::service::find(config).await {
            Ok(Found::Running(service)) => return online(&service, command).await,
            Ok(Found::NotRunning(why)) => Some(why),
            Err(code) => return code,
        }
    };
    let store = match super::open_store_for_cli(config) {
        Ok(s) => s,
        Err(code) => {
            if let Some(why) = why {
                eprintln!("(no admin API to use instead: {why})");
            }
            return code;
        }
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

/// The same command through the service's admin API, printing what the store path prints
/// (numbers masked unless `admin.show_numbers`).
async fn online(service: &Service, command: OutboxCommand) -> ExitCode {
    eprintln!("pbxgate: using the running service at {}", service.base);
    let result = match command {
        OutboxCommand::Stats { recount: true } => Err(
            "--recount counts the records in the store again, which the running service owns: \
             stop it first, or leave --recount out"
                .to_string(),
        ),
        OutboxCommand::Stats { recount: false } => stats(service).await,
        OutboxCommand::List { state, limit } => list(service, &state, limit).await,
        OutboxCommand::Retry { id, all_dead } => retry(service, id.as_deref(), all_dead).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            ExitCode::from(1)
        }
    }
}

fn count(status: &Value, key: &str) -> u64 {
    status.get(key).and_then(Value::as_u64).unwrap_or(0)
}

async fn stats(service: &Service) -> Result<(), String> {
    let queue = service.get("/admin/api/queue?limit=1").await?;
    let status = &queue["status"];
    println!("pending  {}", count(status, "pending"));
    println!("dead     {}", count(status, "dead"));
    println!("done     {}", count(status, "done"));
    match status
        .get("oldestPendingAgeSeconds")
        .and_then(Value::as_i64)
    {
        Some(s) => println!("oldest pending: {s} s ago"),
        None => println!("oldest pending: -"),
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Item {
    external_id: String,
    direction: Direction,
    phone: String,
    outcome: Outcome,
    attempts: u32,
    reason: Option<String>,
}

async fn list(service: &Service, state: &str, limit: usize) -> Result<(), String> {
    let limit = limit.clamp(1, crate::admin::QUEUE_MAX_LIMIT);
    let queue = service
        .get(&format!("/admin/api/queue?state={state}&limit={limit}"))
        .await?;
    let items: Vec<Item> = serde_json::from_value(queue["items"].clone())
        .map_err(|e| format!("the service's queue: {e}"))?;
    for e in items {
        println!(
            "{}\t{:?}\t{}\t{:?}\tattempts={}\t{}",
            e.external_id,
            e.direction,
            e.phone,
            e.outcome,
            e.attempts,
            e.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

async fn retry(service: &Service, id: Option<&str>, all_dead: bool) -> Result<(), String> {
    let path = match id {
        Some(id) if !all_dead => {
            let mut url = url::Url::parse("http://x/admin/api/queue").expect("a valid URL");
            url.path_segments_mut()
                .expect("a base URL")
                .push(id)
                .push("retry");
            url.path().to_string()
        }
        _ => "/admin/api/queue/retry-dead".to_string(),
    };
    let (status, body) = service.post(&path, None).await?;
    let moved = match status.as_u16() {
        200 => body
            .get("moved")
            .and_then(Value::as_u64)
            .unwrap_or(u64::from(!all_dead)),
        // Not in the queue, or not dead: nothing moved, as on the store.
        404 | 409 => {
            eprintln!("{}", Service::reason(status, &body));
            0
        }
        _ => return Err(Service::reason(status, &body)),
    };
    println!("{moved} record(s) moved back to pending");
    Ok(())
}
