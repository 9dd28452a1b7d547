//! The retailCRM API v5 wire types for the telephony surface. Field names are the contract.
//! Requests omit `None` fields; responses are parsed leniently (see `lenient`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::lenient;

// ---------------------------------------------------------------------------------------------
// Integration module

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationModule {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_string"
    )]
    pub code: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_string"
    )]
    pub integration_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Set by retailCRM (billing); never sent by us.
    #[serde(default, skip_serializing)]
    pub freeze: Option<bool>,
    #[serde(default, skip_serializing)]
    pub native: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Relative paths from `baseUrl`, e.g. `{"activity": "/crm/activity"}`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_object"
    )]
    pub actions: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_countries: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_url: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_object"
    )]
    pub integrations: Option<Integrations>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Integrations {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_object"
    )]
    pub telephony: Option<TelephonyConfiguration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelephonyConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make_call_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_user_status_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_edit: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_event_supported: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_event_supported: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hangup_event_supported: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_list"
    )]
    pub additional_codes: Option<Vec<AdditionalCode>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_list"
    )]
    pub external_phones: Option<Vec<ExternalPhoneCode>>,
}

fn opt_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    lenient::list(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdditionalCode {
    #[serde(deserialize_with = "lenient::id")]
    pub user_id: i64,
    #[serde(deserialize_with = "lenient::string")]
    pub code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPhoneCode {
    #[serde(deserialize_with = "lenient::string")]
    pub site_code: String,
    #[serde(deserialize_with = "lenient::string")]
    pub external_phone: String,
}

/// `integration-modules/{code}/edit` answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleEditResponse {
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub info: Option<ModuleEditInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleEditInfo {
    #[serde(default, deserialize_with = "lenient::id_list")]
    pub not_exist_users_ids: Vec<i64>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub not_exist_site_codes: Vec<String>,
}

/// `GET integration-modules/{code}` answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleGetResponse {
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub integration_module: Option<IntegrationModule>,
}

// ---------------------------------------------------------------------------------------------
// telephony/manager

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagerResponse {
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub manager: Option<Manager>,
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub customer: Option<Customer>,
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub links: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manager {
    #[serde(default, deserialize_with = "lenient::opt_id")]
    pub id: Option<i64>,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub patronymic: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    /// The manager's extension in our telephony.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub code: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    #[serde(default, deserialize_with = "lenient::opt_id")]
    pub id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub external_id: Option<String>,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub patronymic: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient::list")]
    pub phones: Vec<CustomerPhone>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CustomerPhone {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub number: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// telephony/call/event

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallEventType {
    In,
    Out,
    Hangup,
}

/// Only meaningful with `type = hangup`. Note `no answered` here vs `no answer` in uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HangupStatus {
    #[serde(rename = "answered")]
    Answered,
    #[serde(rename = "busy")]
    Busy,
    #[serde(rename = "cancel")]
    Cancel,
    #[serde(rename = "failed")]
    Failed,
    #[serde(rename = "no answered")]
    NoAnswered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallEvent {
    pub phone: String,
    #[serde(rename = "type")]
    pub kind: CallEventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hangup_status: Option<HangupStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_analytics_data: Option<WebAnalyticsData>,
}

impl CallEvent {
    pub fn new(kind: CallEventType, phone: impl Into<String>) -> Self {
        CallEvent {
            phone: phone.into(),
            kind,
            codes: None,
            user_ids: None,
            site: None,
            hangup_status: None,
            external_phone: None,
            call_external_id: None,
            web_analytics_data: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebAnalyticsData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<Campaign>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_string: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallEventResponse {
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub not_exist_codes: Vec<String>,
    #[serde(default, deserialize_with = "lenient::id_list")]
    pub not_exist_users: Vec<i64>,
}

// ---------------------------------------------------------------------------------------------
// telephony/calls/upload

/// Most calls accepted by one `calls/upload` request.
pub const MAX_CALLS_PER_UPLOAD: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallResult {
    #[serde(rename = "answered")]
    Answered,
    #[serde(rename = "busy")]
    Busy,
    #[serde(rename = "failed")]
    Failed,
    #[serde(rename = "no answer")]
    NoAnswer,
    #[serde(rename = "not allowed")]
    NotAllowed,
    #[serde(rename = "unknown")]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Call {
    /// `Y-m-d H:i:s` in the account's time zone.
    pub date: String,
    #[serde(rename = "type")]
    pub kind: CallType,
    pub phone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    pub result: CallResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_waiting: Option<u64>,
    pub external_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Google Analytics client id (not our module's clientId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

impl Call {
    /// Why retailCRM must reject this call, if it must (checked before every upload: such a
    /// record is held by pbxgate instead of being refused by the CRM).
    pub fn problem(&self) -> Option<String> {
        if self.phone.trim().is_empty() {
            return Some("phone: the customer's number is unknown".into());
        }
        if self.code.as_deref().is_none_or(|c| c.trim().is_empty()) && self.user_id.is_none() {
            return Some(
                "code: no extension handled the call and calls.unassigned_code is empty \
                 (retailCRM requires code or userId)"
                    .into(),
            );
        }
        if self.date.len() != 19 {
            return Some("date: the call's start time is not known".into());
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallsUploadResponse {
    #[serde(default, deserialize_with = "lenient::opt_id")]
    pub processed_calls_count: Option<i64>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub duplicate_calls: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// tasks/create

/// A task as `tasks/create` takes it (form field `task`, a JSON object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commentary: Option<String>,
    /// `Y-m-d H:i` in the account's time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datetime: Option<String>,
    pub performer_id: i64,
    /// The customer's number (retailCRM shows it with the task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// `tasks/create` answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TaskCreateResponse {
    #[serde(default, deserialize_with = "lenient::opt_id")]
    pub id: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// users/{id}/status, credentials

pub use crate::crm::port::UserStatus;

/// `GET /api/v5/settings` (only what we use).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SettingsResponse {
    #[serde(default, deserialize_with = "lenient::opt_object")]
    pub settings: Option<serde_json::Value>,
}

impl SettingsResponse {
    /// `settings.timezone.value`, e.g. `Europe/Moscow`.
    pub fn timezone(&self) -> Option<String> {
        self.settings
            .as_ref()?
            .get("timezone")?
            .get("value")?
            .as_str()
            .map(str::to_string)
    }
}

/// An answer with nothing but `success`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// Old-style keys list the methods they may call.
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub credentials: Vec<String>,
    /// New-style keys list scopes.
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub scopes: Vec<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub site_access: Option<String>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub sites_available: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn call_event_omits_nulls_and_uses_wire_names() {
        let mut e = CallEvent::new(CallEventType::Hangup, "+79990001122");
        e.hangup_status = Some(HangupStatus::NoAnswered);
        e.codes = Some(vec!["101".into()]);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"phone": "+79990001122", "type": "hangup", "codes": ["101"], "hangupStatus": "no answered"})
        );
    }

    #[test]
    fn task_uses_wire_names_and_omits_nulls() {
        let t = Task {
            text: "Missed call from +79990001122".into(),
            commentary: None,
            datetime: Some("2026-11-21 14:00".into()),
            performer_id: 7,
            phone: Some("+79990001122".into()),
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"text": "Missed call from +79990001122", "datetime": "2026-11-21 14:00",
                   "performerId": 7, "phone": "+79990001122"})
        );
    }

    #[test]
    fn call_result_names() {
        assert_eq!(
            serde_json::to_value(CallResult::NoAnswer).unwrap(),
            json!("no answer")
        );
        assert_eq!(
            serde_json::to_value(CallResult::NotAllowed).unwrap(),
            json!("not allowed")
        );
    }

    #[test]
    fn manager_absent_null_empty_object_or_array() {
        for body in [
            json!({}),
            json!({"manager": null}),
            json!({"manager": {}}),
            json!({"manager": []}),
        ] {
            let r: ManagerResponse = serde_json::from_value(body.clone()).unwrap();
            assert!(r.manager.is_none(), "{body}");
        }
        let r: ManagerResponse =
            serde_json::from_value(json!({"manager": {"id": "7", "code": 12}, "links": []}))
                .unwrap();
        let m = r.manager.unwrap();
        assert_eq!(m.id, Some(7));
        assert_eq!(m.code.as_deref(), Some("12"));
        assert!(r.links.is_none());
    }

    #[test]
    fn edit_info_may_be_an_empty_array_and_ids_strings() {
        let r: ModuleEditResponse =
            serde_json::from_value(json!({"success": true, "info": []})).unwrap();
        assert!(r.info.is_none());
        let r: ModuleEditResponse = serde_json::from_value(
            json!({"info": {"notExistUsersIds": ["5", 6], "notExistSiteCodes": {"0": "shop9"}, "billingInfo": {}}}),
        )
        .unwrap();
        let info = r.info.unwrap();
        assert_eq!(info.not_exist_users_ids, vec![5, 6]);
        assert_eq!(info.not_exist_site_codes, vec!["shop9".to_string()]);
    }
}
