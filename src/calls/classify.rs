//! Which role a channel plays, from its name and where it was created.
//!
//! Channel names: `PJSIP/<endpoint>-<seq>` (also SIP, IAX2, DAHDI...), and Local channel halves
//! `Local/<exten>@<context>-<seq>;1|2`. Rules (all configurable in `[calls]`):
//! - a channel created in one of `inbound_contexts` (or an endpoint in `trunk_endpoints` that was
//!   not dialled by us) is the **customer** of an inbound call;
//! - an endpoint or Local exten matching `extension_pattern` (or one of the `[[users]]` codes) is
//!   a manager's **extension**;
//! - an endpoint in `trunk_endpoints`, or a Local channel to a number that is not an extension,
//!   is an **external** leg when dialled (the customer of an outbound call).

use regex::Regex;

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// A manager's phone (or a Local channel standing for it).
    Extension(String),
    /// A carrier trunk channel.
    Trunk,
    /// A Local channel towards an external number (`Local/+4930123456@pstn-sim`).
    External(String),
    /// Anything else (IVR, conference, unknown endpoint).
    Other,
}

/// A channel name taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelName<'a> {
    pub tech: &'a str,
    /// Endpoint (`101`, `trunk`) or, for Local, the exten.
    pub resource: &'a str,
    /// For Local: the context.
    pub context: Option<&'a str>,
    /// For Local: 1 or 2.
    pub half: Option<u8>,
}

pub fn parse_name(name: &str) -> ChannelName<'_> {
    let (tech, rest) = name.split_once('/').unwrap_or((name, ""));
    if tech.eq_ignore_ascii_case("Local") {
        let (body, half) = match rest.rsplit_once(';') {
            Some((b, h)) => (b, h.parse().ok()),
            None => (rest, None),
        };
        let (exten, ctx) = body.split_once('@').unwrap_or((body, ""));
        // The context carries a `-<hex>` suffix.
        let ctx = ctx.rsplit_once('-').map_or(ctx, |(c, _)| c);
        ChannelName {
            tech,
            resource: exten,
            context: Some(ctx),
            half,
        }
    } else {
        // `<endpoint>-<seq>`; endpoints may contain '-' themselves, the sequence is the last part.
        let endpoint = rest.rsplit_once('-').map_or(rest, |(e, _)| e);
        ChannelName {
            tech,
            resource: endpoint,
            context: None,
            half: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Classifier {
    extension: Regex,
    codes: Vec<String>,
    inbound_contexts: Vec<String>,
    trunk_endpoints: Vec<String>,
    min_external_digits: usize,
}

impl Classifier {
    pub fn new(config: &Config) -> Classifier {
        let c = &config.calls;
        Classifier {
            // Validated at config load.
            extension: Regex::new(&c.extension_pattern)
                .unwrap_or_else(|_| Regex::new("^[0-9]{2,5}$").expect("static regex")),
            codes: config.users.iter().map(|u| u.code.clone()).collect(),
            inbound_contexts: c.inbound_contexts.clone(),
            trunk_endpoints: c.trunk_endpoints.clone(),
            min_external_digits: config.phone.min_external_length,
        }
    }

    pub fn is_extension(&self, s: &str) -> bool {
        !s.is_empty() && (self.codes.iter().any(|c| c == s) || self.extension.is_match(s))
    }

    pub fn is_inbound_context(&self, ctx: &str) -> bool {
        self.inbound_contexts.iter().any(|c| c == ctx)
    }

    /// A number that reaches outside the PBX (not an extension, long enough).
    pub fn is_external_number(&self, s: &str) -> bool {
        let digits = s.strip_prefix('+').unwrap_or(s);
        !self.is_extension(s)
            && digits.len() >= self.min_external_digits
            && digits.bytes().all(|b| b.is_ascii_digit())
    }

    pub fn role(&self, name: &str) -> Role {
        let n = parse_name(name);
        if n.tech.eq_ignore_ascii_case("Local") {
            let ctx = n.context.unwrap_or("");
            if self.is_inbound_context(ctx) {
                return Role::Other;
            }
            if self.is_extension(n.resource) {
                return Role::Extension(n.resource.to_string());
            }
            if self.is_external_number(n.resource) {
                return Role::External(n.resource.to_string());
            }
            return Role::Other;
        }
        if self.trunk_endpoints.iter().any(|t| t == n.resource) {
            return Role::Trunk;
        }
        if self.is_extension(n.resource) {
            return Role::Extension(n.resource.to_string());
        }
        Role::Other
    }
}

/// The number part of a Dial string: `+4930555486@trunk` → `+4930555486`, `PJSIP/102` → `102`.
pub fn dial_string_number(dial_string: &str) -> &str {
    let s = dial_string.split(['&', ',']).next().unwrap_or("");
    let s = s.rsplit_once('/').map_or(s, |(_, r)| r);
    s.split('@').next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier() -> Classifier {
        let mut c = Config::default();
        c.calls.inbound_contexts = vec!["from-trunk".into()];
        c.calls.trunk_endpoints = vec!["trunk".into()];
        Classifier::new(&c)
    }

    #[test]
    fn names() {
        let n = parse_name("Local/101@sim-phones-0000000b;1");
        assert_eq!(
            (n.tech, n.resource, n.context, n.half),
            ("Local", "101", Some("sim-phones"), Some(1))
        );
        let n = parse_name("PJSIP/trunk-00000005");
        assert_eq!((n.tech, n.resource), ("PJSIP", "trunk"));
        let n = parse_name("PJSIP/my-trunk-00000005");
        assert_eq!(n.resource, "my-trunk");
    }

    #[test]
    fn roles() {
        let c = classifier();
        assert_eq!(c.role("PJSIP/101-00000006"), Role::Extension("101".into()));
        assert_eq!(
            c.role("Local/102@queue-agents-00000003;1"),
            Role::Extension("102".into())
        );
        assert_eq!(c.role("PJSIP/trunk-00000005"), Role::Trunk);
        assert_eq!(
            c.role("Local/+4930123456@pstn-sim-00000002;1"),
            Role::External("+4930123456".into())
        );
        assert_eq!(
            c.role("Local/+4930111000@from-trunk-0000000a;2"),
            Role::Other
        );
        assert_eq!(c.role("PJSIP/unknown-peer-01"), Role::Other);
    }

    #[test]
    fn dial_strings() {
        assert_eq!(dial_string_number("+4930555486@trunk"), "+4930555486");
        assert_eq!(dial_string_number("PJSIP/102"), "102");
        assert_eq!(dial_string_number("101@sim-phones"), "101");
        assert_eq!(
            dial_string_number("Local/101@sim-phones&Local/102@sim-phones,20,t"),
            "101"
        );
    }
}
