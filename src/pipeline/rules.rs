//! Registration rules (`[[rules]]`): which calls reach the CRM.
//!
//! Rules are evaluated in order and the first whose every condition holds decides; no match means
//! register. A condition left out holds for every call; a list holds when any entry does. All
//! patterns are regular expressions anchored to the whole value (`101` is exactly `101`,
//! `1\d\d` is 100–199). Conditions:
//! - `direction`: `in`, `out`, `internal`;
//! - `extension`: any extension of the call (ringing, answering, placing) matches;
//! - `trunk`: the carrier channel's name without its sequence (`PJSIP/trunk`) or its endpoint;
//! - `did`, `phone`: any form of the dialled / the customer's number (see [`crate::phone`]).

use regex::Regex;

use crate::calls::Direction;
use crate::config::{RuleAction, RuleConfig};
use crate::phone::{anchored, any_variant_matches, trunk_matches, Number};

/// What is known about a call when it is decided.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    pub direction: Option<Direction>,
    pub extensions: Vec<&'a str>,
    pub trunk: Option<&'a str>,
    pub did: Option<&'a Number>,
    pub phone: Option<&'a Number>,
}

/// The outcome for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub register: bool,
    /// The rule that decided (`rules[2]` or `rules[2] (name)`); `None` = the default.
    pub rule: Option<String>,
}

impl Decision {
    pub fn default_register() -> Decision {
        Decision {
            register: true,
            rule: None,
        }
    }

    /// For logs and the call's record: `register by rules[1] (vip)`, `register by default`.
    pub fn describe(&self) -> String {
        format!(
            "{} by {}",
            if self.register { "register" } else { "ignore" },
            self.rule.as_deref().unwrap_or("default")
        )
    }
}

#[derive(Debug)]
struct Rule {
    label: String,
    register: bool,
    directions: Vec<Direction>,
    extension: Vec<Regex>,
    trunk: Vec<Regex>,
    did: Vec<Regex>,
    phone: Vec<Regex>,
}

/// The compiled `[[rules]]`.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

fn direction(s: &str) -> Option<Direction> {
    match s {
        "in" => Some(Direction::In),
        "out" => Some(Direction::Out),
        "internal" => Some(Direction::Internal),
        _ => None,
    }
}

fn compile(i: usize, key: &str, patterns: &[String]) -> Result<Vec<Regex>, Vec<String>> {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for (j, p) in patterns.iter().enumerate() {
        match anchored(p) {
            Ok(r) => ok.push(r),
            Err(e) => problems.push(format!("rules[{i}].{key}[{j}]: invalid pattern {p:?}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err(problems)
    }
}

fn compile_rule(i: usize, r: &RuleConfig) -> Result<Rule, Vec<String>> {
    let mut problems = Vec::new();
    let mut directions = Vec::new();
    for (j, d) in r.direction.iter().enumerate() {
        match direction(d) {
            Some(d) => directions.push(d),
            None => problems.push(format!(
                "rules[{i}].direction[{j}]: {d:?} is not one of in, out, internal"
            )),
        }
    }
    let mut field = |key: &str, patterns: &[String]| match compile(i, key, patterns) {
        Ok(v) => v,
        Err(p) => {
            problems.extend(p);
            Vec::new()
        }
    };
    let extension = field("extension", &r.extension);
    let trunk = field("trunk", &r.trunk);
    let did = field("did", &r.did);
    let phone = field("phone", &r.phone);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Rule {
        label: match &r.name {
            Some(n) => format!("rules[{i}] ({n})"),
            None => format!("rules[{i}]"),
        },
        register: r.action == RuleAction::Register,
        directions,
        extension,
        trunk,
        did,
        phone,
    })
}

/// Reports every invalid rule, naming its index and key.
pub fn check_config(rules: &[RuleConfig], problems: &mut Vec<String>) {
    for (i, r) in rules.iter().enumerate() {
        if let Err(p) = compile_rule(i, r) {
            problems.extend(p);
        }
    }
}

impl Rules {
    /// Compiles the rules; they were validated at load, so an invalid one (impossible after
    /// [`check_config`]) is left out.
    pub fn new(rules: &[RuleConfig]) -> Rules {
        Rules {
            rules: rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| compile_rule(i, r).ok())
                .collect(),
        }
    }

    pub fn decide(&self, f: &Facts<'_>) -> Decision {
        for r in &self.rules {
            if r.matches(f) {
                return Decision {
                    register: r.register,
                    rule: Some(r.label.clone()),
                };
            }
        }
        Decision::default_register()
    }
}

impl Rule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let dir_ok =
            self.directions.is_empty() || f.direction.is_some_and(|d| self.directions.contains(&d));
        let ext_ok = self.extension.is_empty()
            || f.extensions
                .iter()
                .any(|e| self.extension.iter().any(|p| p.is_match(e)));
        let trunk_ok = self.trunk.is_empty()
            || f.trunk
                .is_some_and(|t| self.trunk.iter().any(|p| trunk_matches(p, t)));
        let did_ok = self.did.is_empty()
            || f.did
                .is_some_and(|n| self.did.iter().any(|p| any_variant_matches(p, n)));
        let phone_ok = self.phone.is_empty()
            || f.phone
                .is_some_and(|n| self.phone.iter().any(|p| any_variant_matches(p, n)));
        dir_ok && ext_ok && trunk_ok && did_ok && phone_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PhoneConfig;
    use crate::phone::PhoneBook;

    fn rule(action: RuleAction) -> RuleConfig {
        RuleConfig::new(action)
    }

    fn book() -> PhoneBook {
        PhoneBook::new(&PhoneConfig {
            country_code: "7".into(),
            national_prefix: "8".into(),
            national_length: 10,
            ..PhoneConfig::default()
        })
    }

    #[test]
    fn no_rules_register_everything() {
        let d = Rules::new(&[]).decide(&Facts::default());
        assert_eq!(d, Decision::default_register());
        assert_eq!(d.describe(), "register by default");
    }

    #[test]
    fn each_condition_matches_on_its_own() {
        let b = book();
        let phone = b.normalize("+79161234567", None);
        let did = b.normalize("84951234567", None);
        let facts = Facts {
            direction: Some(Direction::In),
            extensions: vec!["101", "205"],
            trunk: Some("PJSIP/mts-trunk"),
            did: Some(&did),
            phone: Some(&phone),
        };
        let cases: Vec<(RuleConfig, bool)> = vec![
            (
                RuleConfig {
                    direction: vec!["in".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    direction: vec!["out".into(), "internal".into()],
                    ..rule(RuleAction::Ignore)
                },
                false,
            ),
            (
                RuleConfig {
                    extension: vec![r"2\d\d".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            // Anchored: "10" does not match "101".
            (
                RuleConfig {
                    extension: vec!["10".into()],
                    ..rule(RuleAction::Ignore)
                },
                false,
            ),
            (
                RuleConfig {
                    trunk: vec!["mts-.*".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    trunk: vec!["PJSIP/mts-trunk".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    trunk: vec!["beeline".into()],
                    ..rule(RuleAction::Ignore)
                },
                false,
            ),
            // The DID matches in any of its forms.
            (
                RuleConfig {
                    did: vec![r"\+74951234567".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    did: vec!["84951234567".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    phone: vec!["8916.*".into()],
                    ..rule(RuleAction::Ignore)
                },
                true,
            ),
            (
                RuleConfig {
                    phone: vec!["8926.*".into()],
                    ..rule(RuleAction::Ignore)
                },
                false,
            ),
            // All conditions of a rule must hold.
            (
                RuleConfig {
                    direction: vec!["in".into()],
                    phone: vec!["8926.*".into()],
                    ..rule(RuleAction::Ignore)
                },
                false,
            ),
        ];
        for (i, (r, matches)) in cases.into_iter().enumerate() {
            let d = Rules::new(std::slice::from_ref(&r)).decide(&facts);
            assert_eq!(!d.register, matches, "case {i}: {r:?}");
            assert_eq!(d.rule.is_some(), matches, "case {i}");
        }
        // A condition on something the call does not have does not hold.
        let bare = Facts::default();
        let r = RuleConfig {
            trunk: vec![".*".into()],
            ..rule(RuleAction::Ignore)
        };
        assert!(Rules::new(&[r]).decide(&bare).register);
    }

    #[test]
    fn the_first_match_wins() {
        let b = book();
        let phone = b.normalize("89161234567", None);
        let facts = Facts {
            direction: Some(Direction::Out),
            extensions: vec!["150"],
            phone: Some(&phone),
            ..Facts::default()
        };
        // A white list: register the VIP number, ignore everything else from extension 150.
        let rules = Rules::new(&[
            RuleConfig {
                name: Some("vip".into()),
                phone: vec![r"\+7916.*".into()],
                ..rule(RuleAction::Register)
            },
            RuleConfig {
                extension: vec!["150".into()],
                ..rule(RuleAction::Ignore)
            },
        ]);
        let d = rules.decide(&facts);
        assert!(d.register);
        assert_eq!(d.describe(), "register by rules[0] (vip)");
        let other = b.normalize("89261234567", None);
        let d = rules.decide(&Facts {
            phone: Some(&other),
            ..facts.clone()
        });
        assert!(!d.register);
        assert_eq!(d.describe(), "ignore by rules[1]");
    }

    #[test]
    fn invalid_rules_are_named_by_index() {
        let rules = vec![
            rule(RuleAction::Ignore),
            RuleConfig {
                direction: vec!["sideways".into()],
                phone: vec!["(".into()],
                ..rule(RuleAction::Ignore)
            },
        ];
        let mut problems = Vec::new();
        check_config(&rules, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("rules[1].direction[0]"));
        assert!(problems[1].starts_with("rules[1].phone[0]"));
    }
}
