//! Phone numbers: every number we handle is kept in four forms.
//!
//! - `original`: as the PBX (or the CRM) gave it;
//! - `base`: the number without any prefix (the national significant number for numbers of our
//!   own country, the digits after `+` for foreign ones, the digits of internal numbers);
//! - `canonical`: the one form we send to the CRM (`+<country><base>` when the country is known);
//! - `variants`: every form worth trying when matching (canonical, without `+`, with the national
//!   prefix, the base, the original digits).
//!
//! Rules, applied in this order (all from `[phone]`):
//! 1. cleaning: `tel:`/`sip:` URIs are reduced to their user part; spaces, dashes, dots, slashes
//!    and brackets go; a leading `+` stays;
//! 2. `[[phone.rewrite]]` rules in order, each on the result of the previous (a rule with `trunk`
//!    applies only to calls over a matching trunk);
//! 3. a number shorter than `min_external_length` digits is internal and left as it is;
//! 4. `+…` is international already; an international prefix (`00`) becomes `+`; the national
//!    prefix (`8`, `0`) is replaced by `+<country_code>`; a number of exactly `national_length`
//!    digits gets `+<country_code>`; `<country_code>` + `national_length` digits gets a `+`;
//! 5. failing that, one access prefix (`prefixes`, e.g. `9`) is stripped if what remains is
//!    recognised by rule 4.
//!
//! A number of our employees' mobiles (`[[phone.fmc]]`) belongs to an extension: a call from it
//! is the employee, not a customer.

use std::collections::HashMap;

use regex::Regex;
use serde::Serialize;

use crate::config::{PhoneConfig, RewriteRule};

/// Longest input we look at; anything longer is not a phone number.
pub const MAX_INPUT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Number {
    pub original: String,
    pub base: String,
    pub canonical: String,
    pub variants: Vec<String>,
    /// Shorter than `phone.min_external_length`: an extension or a service code, never a
    /// customer.
    pub internal: bool,
}

impl Number {
    /// No usable number (anonymous, "unknown", empty).
    pub fn is_empty(&self) -> bool {
        self.canonical.is_empty()
    }

    /// A number that can be a customer's.
    pub fn is_external(&self) -> bool {
        !self.internal && !self.is_empty()
    }
}

#[derive(Debug)]
struct Rewrite {
    pattern: Regex,
    replace: String,
    trunk: Option<Regex>,
}

/// The compiled `[phone]` section.
#[derive(Debug)]
pub struct PhoneBook {
    country_code: String,
    national_prefix: String,
    national_length: usize,
    international_prefixes: Vec<String>,
    prefixes: Vec<String>,
    min_external_length: usize,
    rewrites: Vec<Rewrite>,
    /// Canonical employee mobile → extension.
    fmc: HashMap<String, String>,
}

/// Compiles a pattern anchored to the whole value (`101` matches only `101`).
pub fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let e = regex_error(&e);
        let hint = if pattern.starts_with('+') {
            " (a literal plus is written \\+; or leave it out: every form of the number is tried)"
        } else {
            ""
        };
        format!("{e}{hint}")
    })
}

/// regex's errors span several lines (the pattern, a caret, the message): the message alone.
pub fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or(&text);
    last.trim_start_matches("error: ").to_string()
}

/// Compiles a rewrite rule's trunk condition; `None` when the rule has none.
fn trunk_pattern(rule: &RewriteRule) -> Result<Option<Regex>, String> {
    rule.trunk.as_deref().map(anchored).transpose()
}

/// Checks the `[phone]` section's patterns; each problem names its key.
pub fn check_config(c: &PhoneConfig, problems: &mut Vec<String>) {
    for (i, r) in c.rewrite.iter().enumerate() {
        if let Err(e) = Regex::new(&r.r#match) {
            problems.push(format!(
                "phone.rewrite[{i}].match: invalid pattern: {}",
                regex_error(&e)
            ));
        }
        if let Err(e) = trunk_pattern(r) {
            problems.push(format!("phone.rewrite[{i}].trunk: invalid pattern: {e}"));
        }
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !c.country_code.is_empty() && (!digits(&c.country_code) || c.country_code.len() > 3) {
        problems.push("phone.country_code: must be 1 to 3 digits (e.g. \"7\", \"49\")".into());
    }
    if !c.national_prefix.is_empty() && !digits(&c.national_prefix) {
        problems.push("phone.national_prefix: must be digits (e.g. \"8\", \"0\")".into());
    }
    for (key, list) in [
        ("international_prefixes", &c.international_prefixes),
        ("prefixes", &c.prefixes),
    ] {
        for (i, p) in list.iter().enumerate() {
            if !digits(p) || p.len() > 6 {
                problems.push(format!("phone.{key}[{i}]: must be 1 to 6 digits"));
            }
        }
    }
    for (i, f) in c.fmc.iter().enumerate() {
        if clean(&f.number).trim_start_matches('+').len() < c.min_external_length {
            problems.push(format!(
                "phone.fmc[{i}].number: {:?} is not an external number",
                f.number
            ));
        }
        if f.code.is_empty() {
            problems.push(format!("phone.fmc[{i}].code: must not be empty"));
        }
    }
}

/// Reduces a raw number to an optional leading `+` and digits. URIs (`sip:+7916…@host;x=y`,
/// `tel:…`) give their user part; anything that is not a number (`anonymous`) gives "".
pub fn clean(raw: &str) -> String {
    let mut s = raw.trim();
    if s.len() > MAX_INPUT {
        return String::new();
    }
    for scheme in ["sips:", "sip:", "tel:"] {
        if s.len() >= scheme.len() && s[..scheme.len()].eq_ignore_ascii_case(scheme) {
            s = &s[scheme.len()..];
        }
    }
    s = s.split(['@', ';']).next().unwrap_or("");
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.trim().chars().enumerate() {
        match c {
            '+' if i == 0 => out.push('+'),
            '0'..='9' => out.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            // Letters or other symbols: not a phone number.
            _ => return String::new(),
        }
    }
    if out == "+" {
        out.clear();
    }
    out
}

impl PhoneBook {
    /// Compiles the section; the config was validated at load, so bad patterns are skipped.
    pub fn new(c: &PhoneConfig) -> PhoneBook {
        let rewrites = c
            .rewrite
            .iter()
            .filter_map(|r| {
                Some(Rewrite {
                    pattern: Regex::new(&r.r#match).ok()?,
                    replace: r.replace.clone(),
                    trunk: trunk_pattern(r).ok()?,
                })
            })
            .collect();
        let mut book = PhoneBook {
            country_code: c.country_code.clone(),
            national_prefix: c.national_prefix.clone(),
            national_length: c.national_length,
            international_prefixes: c.international_prefixes.clone(),
            prefixes: c.prefixes.clone(),
            min_external_length: c.min_external_length,
            rewrites,
            fmc: HashMap::new(),
        };
        for f in &c.fmc {
            let n = book.normalize(&f.number, None);
            if n.is_external() {
                book.fmc.insert(n.canonical, f.code.clone());
            }
        }
        book
    }

    /// A number as given, seen from a call over `trunk` (a channel name or endpoint, for the
    /// trunk-specific rewrite rules).
    pub fn normalize(&self, raw: &str, trunk: Option<&str>) -> Number {
        let original: String = raw.chars().take(MAX_INPUT).collect();
        let mut s = clean(raw);
        for r in &self.rewrites {
            if let Some(t) = &r.trunk {
                if !trunk.is_some_and(|name| trunk_matches(t, name)) {
                    continue;
                }
            }
            if r.pattern.is_match(&s) {
                s = clean(&r.pattern.replace(&s, r.replace.as_str()));
            }
        }
        if s.is_empty() {
            return Number {
                original,
                base: String::new(),
                canonical: String::new(),
                variants: Vec::new(),
                internal: false,
            };
        }
        let digits = s.trim_start_matches('+');
        if !s.starts_with('+') && digits.len() < self.min_external_length {
            return Number {
                original,
                base: s.clone(),
                canonical: s.clone(),
                variants: vec![s],
                internal: true,
            };
        }
        let canonical = if s.starts_with('+') {
            s.clone()
        } else {
            self.international(&s)
                .or_else(|| {
                    self.prefixes.iter().find_map(|p| {
                        s.strip_prefix(p.as_str())
                            .and_then(|rest| self.international(rest))
                    })
                })
                .unwrap_or_else(|| s.clone())
        };
        let domestic = !self.country_code.is_empty()
            && canonical
                .strip_prefix('+')
                .is_some_and(|d| d.starts_with(&self.country_code));
        let base = if domestic {
            canonical[1 + self.country_code.len()..].to_string()
        } else {
            canonical.trim_start_matches('+').to_string()
        };
        let mut variants = Vec::with_capacity(6);
        let mut add = |v: String| {
            if !v.is_empty() && !variants.contains(&v) {
                variants.push(v);
            }
        };
        add(canonical.clone());
        add(canonical.trim_start_matches('+').to_string());
        if domestic && !self.national_prefix.is_empty() {
            add(format!("{}{}", self.national_prefix, base));
        }
        add(base.clone());
        add(s.clone());
        add(clean(raw));
        Number {
            original,
            base,
            canonical,
            variants,
            internal: false,
        }
    }

    /// Rule 4: a number without `+` in international form, if it is recognisable.
    fn international(&self, s: &str) -> Option<String> {
        let long_enough = |rest: &str| rest.len() >= self.min_external_length;
        for ip in &self.international_prefixes {
            if let Some(rest) = s.strip_prefix(ip.as_str()) {
                if long_enough(rest) {
                    return Some(format!("+{rest}"));
                }
            }
        }
        if self.country_code.is_empty() {
            return None;
        }
        let national_ok = |rest: &str| {
            if self.national_length > 0 {
                rest.len() == self.national_length
            } else {
                long_enough(rest)
            }
        };
        if !self.national_prefix.is_empty() {
            if let Some(rest) = s.strip_prefix(self.national_prefix.as_str()) {
                if national_ok(rest) {
                    return Some(format!("+{}{rest}", self.country_code));
                }
            }
        }
        if self.national_length > 0 {
            if s.len() == self.national_length {
                return Some(format!("+{}{s}", self.country_code));
            }
            if let Some(rest) = s.strip_prefix(self.country_code.as_str()) {
                if rest.len() == self.national_length {
                    return Some(format!("+{s}"));
                }
            }
        }
        None
    }

    /// The extension a number belongs to, when it is one of our employees' mobiles.
    pub fn fmc(&self, n: &Number) -> Option<&str> {
        if n.is_external() {
            self.fmc.get(&n.canonical).map(String::as_str)
        } else {
            None
        }
    }

    /// The canonical form of a raw number (empty for none).
    pub fn canonical(&self, raw: &str, trunk: Option<&str>) -> String {
        self.normalize(raw, trunk).canonical
    }
}

/// A trunk pattern matches the channel's base name (`PJSIP/trunk`) or its endpoint (`trunk`).
pub fn trunk_matches(pattern: &Regex, trunk: &str) -> bool {
    pattern.is_match(trunk)
        || trunk
            .split_once('/')
            .is_some_and(|(_, endpoint)| pattern.is_match(endpoint))
}

/// Every normalised form of `n` that `pattern` (anchored) matches; true if any does.
pub fn any_variant_matches(pattern: &Regex, n: &Number) -> bool {
    pattern.is_match(&n.original) || n.variants.iter().any(|v| pattern.is_match(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FmcNumber, PhoneConfig};

    fn russia() -> PhoneConfig {
        PhoneConfig {
            country_code: "7".into(),
            national_prefix: "8".into(),
            national_length: 10,
            international_prefixes: vec!["810".into(), "00".into()],
            prefixes: vec!["9".into()],
            ..PhoneConfig::default()
        }
    }

    fn germany() -> PhoneConfig {
        PhoneConfig {
            country_code: "49".into(),
            national_prefix: "0".into(),
            national_length: 0,
            international_prefixes: vec!["00".into()],
            prefixes: vec![],
            ..PhoneConfig::default()
        }
    }

    fn usa() -> PhoneConfig {
        PhoneConfig {
            country_code: "1".into(),
            national_prefix: "1".into(),
            national_length: 10,
            international_prefixes: vec!["011".into()],
            prefixes: vec!["9".into()],
            ..PhoneConfig::default()
        }
    }

    fn canon(c: &PhoneConfig, raw: &str) -> String {
        PhoneBook::new(c).normalize(raw, None).canonical
    }

    #[test]
    fn russian_numbers() {
        let c = russia();
        for (raw, want) in [
            ("+7 (916) 123-45-67", "+79161234567"),
            ("89161234567", "+79161234567"),
            ("79161234567", "+79161234567"),
            ("9161234567", "+79161234567"),
            ("8 495 123-45-67", "+74951234567"),
            // Access prefix 9 before a national number.
            ("989161234567", "+79161234567"),
            // International via 8-10 and via 00.
            ("81049301234567", "+49301234567"),
            ("0049301234567", "+49301234567"),
            ("tel:+79161234567", "+79161234567"),
            ("sip:89161234567@10.0.0.1;user=phone", "+79161234567"),
            // Internal numbers stay as they are.
            ("101", "101"),
            ("anonymous", ""),
            ("", ""),
        ] {
            assert_eq!(canon(&c, raw), want, "{raw}");
        }
        let n = PhoneBook::new(&c).normalize("8 (916) 123-45-67", None);
        assert_eq!(n.original, "8 (916) 123-45-67");
        assert_eq!(n.base, "9161234567");
        assert_eq!(
            n.variants,
            ["+79161234567", "79161234567", "89161234567", "9161234567"]
        );
        assert!(n.is_external());
        let short = PhoneBook::new(&c).normalize("101", None);
        assert!(short.internal && !short.is_external());
    }

    #[test]
    fn german_numbers() {
        let c = germany();
        for (raw, want) in [
            ("+49 30 1234567", "+49301234567"),
            ("030 1234567", "+49301234567"),
            ("0049 30 1234567", "+49301234567"),
            ("0151/12345678", "+4915112345678"),
            // Foreign numbers keep their own country code.
            ("0079161234567", "+79161234567"),
            // A local number without area code cannot be completed: kept as digits.
            ("1234567", "1234567"),
            ("12", "12"),
        ] {
            assert_eq!(canon(&c, raw), want, "{raw}");
        }
        let n = PhoneBook::new(&c).normalize("030 1234567", None);
        assert_eq!(n.base, "301234567");
        assert!(n.variants.contains(&"0301234567".to_string()));
    }

    #[test]
    fn us_numbers() {
        let c = usa();
        for (raw, want) in [
            ("(212) 555-1234", "+12125551234"),
            ("1-212-555-1234", "+12125551234"),
            ("+1 212 555 1234", "+12125551234"),
            ("9 1 212 555 1234", "+12125551234"),
            ("011 44 20 7946 0958", "+442079460958"),
            ("911", "911"),
        ] {
            assert_eq!(canon(&c, raw), want, "{raw}");
        }
    }

    #[test]
    fn without_a_country_numbers_are_only_cleaned() {
        let c = PhoneConfig::default();
        assert_eq!(canon(&c, "+49 (30) 555-486"), "+4930555486");
        assert_eq!(canon(&c, "0049 30 555486"), "+4930555486");
        assert_eq!(canon(&c, "84951234567"), "84951234567");
    }

    #[test]
    fn rewrites_apply_in_order_and_per_trunk() {
        let mut c = russia();
        c.rewrite = vec![
            RewriteRule {
                r#match: r"^8(\d{10})$".into(),
                replace: "+7$1".into(),
                trunk: None,
            },
            // Only seen after the first rule: order matters.
            RewriteRule {
                r#match: r"^\+7495(\d{7})$".into(),
                replace: "+7499$1".into(),
                trunk: None,
            },
            RewriteRule {
                r#match: r"^(\d{7})$".into(),
                replace: "+7812$1".into(),
                trunk: Some("spb-.*".into()),
            },
        ];
        let book = PhoneBook::new(&c);
        assert_eq!(book.canonical("84951234567", None), "+74991234567");
        assert_eq!(
            book.canonical("1234567", Some("PJSIP/spb-line")),
            "+78121234567"
        );
        assert_eq!(book.canonical("1234567", Some("PJSIP/msk-line")), "1234567");
        assert_eq!(book.canonical("1234567", None), "1234567");
    }

    #[test]
    fn fmc_numbers_belong_to_extensions() {
        let mut c = russia();
        c.fmc = vec![FmcNumber {
            number: "+7 916 000-00-01".into(),
            code: "101".into(),
        }];
        let book = PhoneBook::new(&c);
        assert_eq!(book.fmc(&book.normalize("89160000001", None)), Some("101"));
        assert_eq!(book.fmc(&book.normalize("89160000002", None)), None);
        assert_eq!(book.fmc(&book.normalize("101", None)), None);
    }

    #[test]
    fn config_problems_name_the_key() {
        let mut c = russia();
        c.rewrite = vec![RewriteRule {
            r#match: "(".into(),
            replace: String::new(),
            trunk: Some("[".into()),
        }];
        c.country_code = "x".into();
        c.fmc = vec![FmcNumber {
            number: "12".into(),
            code: String::new(),
        }];
        let mut problems = Vec::new();
        check_config(&c, &mut problems);
        let text = problems.join("\n");
        for key in [
            "phone.rewrite[0].match",
            "phone.rewrite[0].trunk",
            "phone.country_code",
            "phone.fmc[0].number",
            "phone.fmc[0].code",
        ] {
            assert!(text.contains(key), "{key} missing in {text}");
        }
    }

    #[test]
    fn long_or_odd_input_is_not_a_number() {
        let c = russia();
        assert_eq!(canon(&c, &"1".repeat(100)), "");
        assert_eq!(canon(&c, "+"), "");
        assert_eq!(canon(&c, "12+34"), "");
    }
}
