//! `[callgate]`: the CallGate-compatible PBX API (`/rest/find_assignee/`, `/rest/register_call/`,
//! ...), for dialplans written for CallGate.

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError};

use super::checks::problem;
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CallgateConfig {
    /// The key every `/rest/...` request must carry (`ukey=`). Empty: the API answers
    /// `bad_ukey` to everyone.
    #[validate(custom(function = "ukey"))]
    pub ukey: Secret,
    /// The PBX's offset from UTC in hours when a request gives none (`tz`), as in CallGate.
    #[validate(range(min = -12, max = 14, message = "must be between -12 and 14"))]
    pub tz: i32,
}

impl Default for CallgateConfig {
    fn default() -> Self {
        CallgateConfig {
            ukey: Secret::default(),
            tz: 3,
        }
    }
}

fn ukey(value: &Secret) -> Result<(), ValidationError> {
    let v = value.expose();
    if !v.is_empty() && v.chars().count() < 16 {
        return Err(problem("must be at least 16 characters (or empty)"));
    }
    if v.chars().any(|c| c.is_control() || c == ' ' || c == '&') {
        return Err(problem(
            "must not contain spaces, '&' or control characters",
        ));
    }
    Ok(())
}
