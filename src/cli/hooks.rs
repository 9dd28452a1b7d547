//! `pbxgate hooks test <point> --call <externalId | capture file>`: runs the hook configured at a
//! point once, on a call from the store or replayed from an AMI capture, and prints the input
//! it was given, what it answered and what pbxgate makes of the answer.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::calls::CallRecord;
use crate::config::Config;
use crate::hooks::{HookResult, Hooks};
use crate::outbox::store::{OutboxStore, State};
use crate::phone::PhoneBook;
use crate::pipeline::trial::{self, Context, TrialError};
use crate::records::Records;

#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Run a point's hook once on a call: prints the input, the hook's answer and the decision.
    /// Exits 0 if the hook answered success, 1 otherwise.
    Test {
        /// The point, e.g. process_call_params.
        point: String,
        /// An externalId in the store (the service stopped), or an AMI capture file (raw, or
        /// annotated `.txt`); `FILE#EXTERNAL_ID` picks one of its calls, else the first
        /// finished one is tried.
        #[arg(long, value_name = "EXTERNAL_ID|FILE[#EXTERNAL_ID]")]
        call: String,
    },
}

pub async fn run(config: &Config, command: HooksCommand) -> ExitCode {
    match command {
        HooksCommand::Test { point, call } => test(config, &point, &call).await,
    }
}

/// A call found for the trial, and its recording link when the store has one.
struct Found {
    record: CallRecord,
    record_url: Option<String>,
}

async fn test(config: &Config, point: &str, call: &str) -> ExitCode {
    if !trial::supported().contains(&point) {
        eprintln!("pbxgate: {}", TrialError::Unsupported(point.to_string()));
        return ExitCode::from(2);
    }
    let hooks = Hooks::new(&config.hooks, reqwest::Client::new());
    if !hooks.is_configured(point) {
        eprintln!(
            "pbxgate: no hook is configured at {point}: add a [hooks.{point}] section with \
             `command` or `url` to the configuration"
        );
        return ExitCode::from(2);
    }
    let found = match find_call(config, call).await {
        Ok(found) => found,
        Err(code) => return code,
    };
    let phones = PhoneBook::new(&config.phone);
    let context = Context {
        config,
        phones: &phones,
        record_url: found.record_url,
    };
    let built = match trial::input_for(point, &found.record, &context) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("pbxgate: {}: {e}", found.record.external_id);
            return ExitCode::from(1);
        }
    };
    println!("call: {}", found.record.external_id);
    for note in &built.notes {
        println!("note: {note}");
    }
    let mut shown = built.input.clone();
    if let Some(map) = shown.as_object_mut() {
        // As the hook receives it.
        map.insert("point".into(), point.into());
    }
    println!(
        "\ninput:\n{}",
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    );
    let Some(outcome) = hooks.trial(point, built.input.clone(), built.fields).await else {
        return ExitCode::from(2);
    };
    match &outcome.raw {
        Ok(raw) => println!("\noutput:\n{}", raw.trim_end()),
        Err(failure) => println!("\noutput: none ({failure})"),
    }
    println!("\ndecision:");
    match &outcome.result {
        HookResult::Changed(data) if data.is_empty() => {
            println!("unchanged: the hook changed nothing; the defaults stand");
            ExitCode::SUCCESS
        }
        HookResult::Changed(data) => {
            for (field, value) in data {
                println!("changed: {field} = {value}");
            }
            for line in (built.settle)(&built.input, data, &context) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        HookResult::Default(failure) => {
            println!("default: {failure}");
            ExitCode::from(1)
        }
        HookResult::NotConfigured => ExitCode::from(2),
    }
}

/// `--call`: a capture file (`FILE` or `FILE#EXTERNAL_ID`), else an externalId in the store.
async fn find_call(config: &Config, call: &str) -> Result<Found, ExitCode> {
    let (file, wanted) = match call.rsplit_once('#') {
        Some((file, id)) if Path::new(file).is_file() => (Some(file), Some(id)),
        _ if Path::new(call).is_file() => (Some(call), None),
        _ => (None, None),
    };
    match file {
        Some(file) => from_capture(config, file, wanted),
        None => from_store(config, call).await,
    }
}

fn from_capture(config: &Config, file: &str, wanted: Option<&str>) -> Result<Found, ExitCode> {
    let bytes = std::fs::read(file).map_err(|e| {
        eprintln!("pbxgate: cannot read {file}: {e}");
        ExitCode::from(1)
    })?;
    let calls = trial::replay(config, &bytes);
    let chosen = match wanted {
        Some(id) => calls.iter().find(|r| r.external_id == id),
        // Ignored calls never reach the points of a call's history.
        None => calls.iter().find(|r| !r.ignored),
    };
    match chosen {
        Some(record) => Ok(Found {
            record: record.clone(),
            record_url: None,
        }),
        None => {
            let ids: Vec<&str> = calls.iter().map(|r| r.external_id.as_str()).collect();
            match wanted {
                Some(id) => eprintln!(
                    "pbxgate: {file} has no call {id}; its calls: {}",
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                ),
                None => eprintln!("pbxgate: {file} has no finished call to try"),
            }
            Err(ExitCode::from(1))
        }
    }
}

async fn from_store(config: &Config, id: &str) -> Result<Found, ExitCode> {
    let store = super::open_store_for_cli(config)?;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("pbxgate: {e}");
        ExitCode::from(1)
    };
    let queue = OutboxStore::of(&store).map_err(|e| fail(&e))?;
    let looked_up = queue.find(id);
    let closed = queue.close().and(queue.flush().await);
    let held = looked_up.map_err(|e| fail(&e))?;
    closed.map_err(|e| fail(&e))?;
    let record = match held {
        Some((_, Some(envelope))) => envelope.record,
        Some((State::Done, _)) => {
            eprintln!(
                "pbxgate: the call {id} was uploaded already, and the store keeps only the id of \
                 an uploaded call; replay it from an AMI capture instead (--call FILE)"
            );
            return Err(ExitCode::from(1));
        }
        _ => {
            eprintln!(
                "pbxgate: no call {id:?} in the store {} (pending or dead; `pbxgate outbox list` \
                 shows them), and no such file",
                config.storage.path.display()
            );
            return Err(ExitCode::from(1));
        }
    };
    // The link the call was (or will be) uploaded with, if it has one already.
    let record_url = match store.records_secret(&config.records.secret).await {
        Ok(key) => match store.records() {
            Ok(links) => Records::new(config, links, key).url_for(&record),
            Err(_) => None,
        },
        Err(_) => None,
    };
    Ok(Found { record, record_url })
}
