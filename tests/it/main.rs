//! Black-box tests of pbxgate against the fake retailCRM and the scripted AMI peer, over real
//! HTTP and TCP on loopback.

#[path = "../support/mod.rs"]
mod support;

mod activity;
mod admin_api;
mod ami_client;
mod ami_parser;
mod backfill;
mod bitrix24;
mod bitrix24_client;
mod bitrix24_durability;
mod call_credit;
mod call_scenarios;
mod call_tracking;
mod callgate;
mod cli;
mod cli_online;
mod click_to_call;
mod crm_client;
mod dashboard;
mod demo;
mod fake_bitrix24;
mod fake_kommo;
mod hook_bitrix24;
mod hook_failures;
mod hook_kommo;
mod hook_originate;
mod hook_points;
mod hook_records;
mod hook_registration;
mod hook_retailcrm;
mod hook_routing;
mod hooks;
mod hooks_cli;
mod http_api;
mod http_limits;
mod kommo;
mod kommo_client;
mod kommo_durability;
mod kommo_widget;
mod live_events;
mod logs;
mod manager_status;
mod metrics;
mod outbox;
mod packaging;
mod records;
mod registration;
mod restarts;
pub(crate) mod retailcrm_tasks;
mod routing;
mod rules;
