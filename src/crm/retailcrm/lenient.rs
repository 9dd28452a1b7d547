//! Tolerant deserialisers for retailCRM's PHP-shaped JSON: an empty object may arrive as `[]`,
//! ids as numbers or strings, lists as objects keyed by index, booleans as `"true"`.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde::Deserialize;
use serde_json::Value;

/// `null`, absent, `[]` or `{}` → `None`; an object → `Some(T)`.
pub fn opt_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Array(a) if a.is_empty() => Ok(None),
        Value::Object(o) if o.is_empty() => Ok(None),
        v @ Value::Object(_) => serde_json::from_value(v)
            .map(Some)
            .map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "expected an object, got {}",
            kind(&other)
        ))),
    }
}

/// `null`/absent → empty; an array → its items; an object (PHP list with keys) → its values.
pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let items = match Value::deserialize(d)? {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        Value::Object(o) => o.into_iter().map(|(_, v)| v).collect(),
        other => {
            return Err(D::Error::custom(format!(
                "expected a list, got {}",
                kind(&other)
            )))
        }
    };
    items
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(D::Error::custom))
        .collect()
}

/// A list of ids, each a number or a numeric string.
pub fn id_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    let raw: Vec<Value> = list(d)?;
    raw.iter()
        .map(|v| value_to_id(v).map_err(D::Error::custom))
        .collect()
}

/// A list of strings, accepting numbers too (`"101"` or `101`).
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw: Vec<Value> = list(d)?;
    raw.iter()
        .map(|v| {
            value_to_string(v)
                .ok_or_else(|| D::Error::custom(format!("expected a string, got {}", kind(v))))
        })
        .collect()
}

/// An id sent as a number or a numeric string.
pub fn id<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    value_to_id(&Value::deserialize(d)?).map_err(D::Error::custom)
}

/// An optional id; `null` and `""` → `None`.
pub fn opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        v => value_to_id(&v).map(Some).map_err(D::Error::custom),
    }
}

/// An optional string, accepting numbers (`"code": 12`).
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => value_to_string(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a string, got {}", kind(&v)))),
    }
}

/// A string, accepting numbers.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_string(&v)
        .ok_or_else(|| D::Error::custom(format!("expected a string, got {}", kind(&v))))
}

/// `true`/`false`, `"true"`/`"false"`, `1`/`0`.
pub fn value_to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.as_str() {
            "true" | "1" => Some(true),
            "false" | "0" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// retailCRM's `errors`: an object `{field: message}` or an array `[message, ...]` (keys "0",
/// "1", ...). Nested values are flattened with dotted keys; non-strings are rendered as JSON.
pub fn errors_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(v) = v {
        flatten_into("", v, &mut out);
    }
    out
}

fn flatten_into(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Null => {}
        Value::Object(o) => o.iter().for_each(|(k, v)| flatten_into(&join(k), v, out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten_into(&join(&i.to_string()), v, out)),
        Value::String(s) => {
            out.insert(
                if prefix.is_empty() {
                    "0".into()
                } else {
                    prefix.to_string()
                },
                s.clone(),
            );
        }
        other => {
            out.insert(
                if prefix.is_empty() {
                    "0".into()
                } else {
                    prefix.to_string()
                },
                other.to_string(),
            );
        }
    }
}

fn value_to_id(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("id {n} is not an integer")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("id {s:?} is not a number")),
        other => Err(format!("expected an id, got {}", kind(other))),
    }
}

fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_as_object_or_array() {
        let m = errors_map(Some(
            &json!({"phone": "is required", "calls": {"0": {"date": "bad"}}}),
        ));
        assert_eq!(m["phone"], "is required");
        assert_eq!(m["calls.0.date"], "bad");
        let m = errors_map(Some(&json!(["first", "second"])));
        assert_eq!(m["0"], "first");
        assert_eq!(m["1"], "second");
        assert!(errors_map(Some(&json!([]))).is_empty());
        assert!(errors_map(None).is_empty());
    }

    #[test]
    fn bools_in_every_shape() {
        assert_eq!(value_to_bool(&json!("true")), Some(true));
        assert_eq!(value_to_bool(&json!(0)), Some(false));
        assert_eq!(value_to_bool(&json!(true)), Some(true));
        assert_eq!(value_to_bool(&json!({})), None);
    }
}
