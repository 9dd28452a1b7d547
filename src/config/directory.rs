//! `[[users]]` and `[[external_phones]]`: the CRM's users and shops as the PBX knows them
//! (extensions and external numbers).

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{extension_code, phone_number};

#[derive(Debug, Clone, Serialize, Deserialize, Validate, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserCode {
    #[validate(range(min = 1, message = "must be a positive CRM user id"))]
    pub user_id: u64,
    #[validate(custom(function = "extension_code"))]
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalPhone {
    #[validate(length(min = 1, max = 255, message = "must not be empty"))]
    pub site: String,
    #[validate(custom(function = "phone_number"))]
    pub number: String,
}
