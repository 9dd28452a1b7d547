//! `pbxgate outbox ...`: the operator's view of the call-history queue while the service is
//! stopped (one process owns the store): counts, the records in a state, moving dead records
//! back to pending.

use std::process::ExitCode;

use clap::Subcommand;

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

/// Runs one `pbxgate outbox` command against the store (the service must be stopped).
pub async fn run(config: &Config, command: OutboxCommand) -> ExitCode {
    let store = match super::open_store_for_cli(config) {
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
