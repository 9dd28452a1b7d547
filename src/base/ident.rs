//! Phone numbers and extension codes: the one rule each is checked by, everywhere.

/// Drops the separators people and PBXs put in numbers (spaces, dashes, dots, brackets).
pub fn normalize_number(raw: &str) -> String {
    raw.trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}' | '\t'))
        .collect()
}

/// `+79991234567` → `+799*****67`: enough to recognise a call in the logs, not to dial it.
pub fn mask_number(number: &str) -> String {
    let n = number.chars().count();
    if n <= 5 {
        return "*".repeat(n);
    }
    number
        .chars()
        .enumerate()
        .map(|(i, c)| if i < 4 || i >= n - 2 { c } else { '*' })
        .collect()
}

/// Why a text is not an extension code or a phone number (the rule, for error messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdentError(pub &'static str);

/// The parts every checked text shares: `parse` by the type's `is_valid`, reading it back.
macro_rules! checked_text {
    ($name:ident) => {
        impl $name {
            /// The text, if it follows the rule ([`Self::RULE`] is the error otherwise).
            pub fn parse(value: &str) -> Result<$name, IdentError> {
                if Self::is_valid(value) {
                    Ok($name(value.to_string()))
                } else {
                    Err(IdentError(Self::RULE))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// An extension code as CRMs store it: 1 to 16 of digits, `*`, `#`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtensionCode(String);

impl ExtensionCode {
    /// The rule, as every error message states it.
    pub const RULE: &'static str = "must be 1 to 16 of 0-9, '*', '#'";

    pub fn is_valid(value: &str) -> bool {
        (1..=16).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#')
    }
}

checked_text!(ExtensionCode);

/// A phone number as given to or by the PBX: 3 to 20 digits, an optional leading `+`. Checked
/// as it is: [`normalize_number`] first for text typed by people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// The rule, as every error message states it.
    pub const RULE: &'static str = "must be 3 to 20 digits with an optional leading '+'";

    pub fn is_valid(value: &str) -> bool {
        let digits = value.strip_prefix('+').unwrap_or(value);
        (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    }
}

checked_text!(PhoneNumber);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_normalised_and_masked() {
        assert_eq!(normalize_number(" +7 (999) 123-45.67 "), "+79991234567");
        assert_eq!(mask_number("+79991234567"), "+799******67");
        assert_eq!(mask_number("101"), "***");
    }

    #[test]
    fn extension_codes_and_phone_numbers_follow_one_rule_each() {
        for ok in ["1", "101", "*99#", "1234567890123456"] {
            assert!(ExtensionCode::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "10a", "12345678901234567", " 101"] {
            assert_eq!(
                ExtensionCode::parse(bad),
                Err(IdentError(ExtensionCode::RULE)),
                "{bad}"
            );
        }
        for ok in ["101", "+79991234567", "12345678901234567890"] {
            assert!(PhoneNumber::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "12", "+12", "123456789012345678901", "+7 999", "7999x"] {
            assert_eq!(
                PhoneNumber::parse(bad),
                Err(IdentError(PhoneNumber::RULE)),
                "{bad}"
            );
        }
    }
}
