//! `[phone]`: the numbering plan numbers are normalised by, rewrites and employees' mobiles.

use serde::{Deserialize, Serialize};
use validator::Validate;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneConfig {
    /// Our country's calling code without `+` (`7`, `49`, `1`); empty = numbers are only cleaned.
    pub country_code: String,
    /// The national (trunk) prefix before area codes (`8` in Russia, `0` in Germany, `1` in the US).
    pub national_prefix: String,
    /// Digits of a national number without the prefix (10 in Russia and the US); 0 = variable.
    #[validate(range(max = 15, message = "must be at most 15"))]
    pub national_length: usize,
    /// Prefixes that dial abroad (`00`, `810`, `011`): replaced by `+`.
    pub international_prefixes: Vec<String>,
    /// Trunk/access prefixes the PBX puts before external numbers (`9`, `0`): stripped.
    pub prefixes: Vec<String>,
    /// Shortest number (in digits) treated as external; shorter ones are internal.
    #[validate(range(min = 3, max = 20, message = "must be between 3 and 20"))]
    pub min_external_length: usize,
    /// Regular-expression rewrites applied in order before everything else.
    pub rewrite: Vec<RewriteRule>,
    /// Employees' mobile numbers that belong to an extension.
    pub fmc: Vec<FmcNumber>,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        PhoneConfig {
            country_code: String::new(),
            national_prefix: String::new(),
            national_length: 0,
            international_prefixes: vec!["00".into()],
            prefixes: Vec::new(),
            min_external_length: 6,
            rewrite: Vec::new(),
            fmc: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    /// A regular expression on the cleaned number (`+` and digits).
    pub r#match: String,
    /// The replacement; `$1` … refer to the groups.
    pub replace: String,
    /// Only for calls over a trunk matching this pattern (channel `PJSIP/x` or endpoint `x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FmcNumber {
    pub number: String,
    /// The extension the mobile belongs to.
    pub code: String,
}
