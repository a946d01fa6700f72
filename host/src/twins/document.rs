//! Twin documents as JSON: the limits a reported patch must keep (the ones
//! Azure IoT Edge's edgeHub enforces) and merging a patch into a document.
//!
//! Pure functions over `serde_json` values; what is stored, and when, is
//! the twin service's business.

use serde_json::{Map, Value};

/// The largest reported patch, in bytes of JSON.
pub const MAX_PATCH_BYTES: usize = 32 * 1024;
/// The deepest nesting of objects in a patch (the patch itself is level 1).
pub const MAX_DEPTH: usize = 10;
/// The longest property name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest string value, in bytes.
pub const MAX_STRING_BYTES: usize = 4 * 1024;
/// Integers must lie within +/- 2^52 (what a double holds exactly).
pub const MAX_INT: i64 = 1 << 52;

/// Parses and checks a reported patch: a JSON object within the limits.
/// The error says what is wrong and where (a dotted path).
pub fn reported_patch(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.len() > MAX_PATCH_BYTES {
        return Err(format!(
            "the patch is {} bytes, over the limit of {MAX_PATCH_BYTES}",
            body.len()
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the patch is not JSON: {e}"))?;
    let Value::Object(patch) = value else {
        return Err("the patch is not a JSON object".into());
    };
    check_object(&patch, "", 1)?;
    Ok(patch)
}

fn check_object(object: &Map<String, Value>, path: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "{} is nested deeper than {MAX_DEPTH} levels",
            shown(path)
        ));
    }
    for (name, value) in object {
        let here = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        check_name(name, &here)?;
        check_value(value, &here, depth)?;
    }
    Ok(())
}

fn check_name(name: &str, path: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{} has an empty property name", shown(path)));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "property name {:?}... is {} bytes, over the limit of {MAX_NAME_BYTES}",
            name.chars().take(32).collect::<String>(),
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '.' | '$' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "property name {path:?} contains {c:?} ('.', '$', '#', whitespace and control characters are not allowed)"
        ));
    }
    Ok(())
}

fn check_value(value: &Value, path: &str, depth: usize) -> Result<(), String> {
    match value {
        Value::String(s) if s.len() > MAX_STRING_BYTES => Err(format!(
            "{path} is a string of {} bytes, over the limit of {MAX_STRING_BYTES}",
            s.len()
        )),
        Value::Number(n) => {
            let in_range = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => (-MAX_INT..=MAX_INT).contains(&i),
                (None, Some(_)) => false,
                // A float: any finite value JSON can carry.
                (None, None) => true,
            };
            if in_range {
                Ok(())
            } else {
                Err(format!(
                    "{path} is {n}, outside the integers a twin holds (+/- 2^52)"
                ))
            }
        }
        Value::Object(o) => check_object(o, path, depth + 1),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let here = format!("{path}[{i}]");
                if item.is_null() {
                    return Err(format!("{here} is null (arrays may not hold null)"));
                }
                match item {
                    Value::Object(o) => check_object(o, &here, depth + 1)?,
                    other => check_value(other, &here, depth + 1)?,
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "the patch"
    } else {
        path
    }
}

/// Parses and checks a whole document from the cloud (desired, or a
/// reported one read back): a JSON object within the same limits as a
/// reported patch, whose `$version` is a whole number of at least 1. Returns the properties (without `$version`) and
/// the version.
pub fn versioned_document(body: &[u8]) -> Result<(Map<String, Value>, u64), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the document is not JSON: {e}"))?;
    let Value::Object(mut doc) = value else {
        return Err("the document is not a JSON object".into());
    };
    let version = match doc.remove("$version") {
        Some(v) => v
            .as_u64()
            .filter(|v| *v >= 1)
            .ok_or_else(|| format!("$version is {v}, not a whole number of at least 1"))?,
        None => return Err("the document has no $version".into()),
    };
    if body.len() > MAX_PATCH_BYTES + 64 {
        return Err(format!(
            "the document is {} bytes, over the limit of {MAX_PATCH_BYTES}",
            body.len()
        ));
    }
    check_object(&doc, "", 1)?;
    Ok((doc, version))
}

/// The patch that turns `old` into `new`: changed and added keys with
/// their new values, objects diffed key by key, removed keys as `null`.
/// Empty when they are equal.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (name, value) in new {
        match (old.get(name), value) {
            (Some(a), b) if a == b => {}
            (Some(Value::Object(a)), Value::Object(b)) => {
                patch.insert(name.clone(), Value::Object(diff(a, b)));
            }
            _ => {
                patch.insert(name.clone(), value.clone());
            }
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            patch.insert(name.clone(), Value::Null);
        }
    }
    patch
}

/// Applies a patch to a document as JSON merge patch does: objects merge
/// key by key, `null` removes a key, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (name, value) in patch {
        match value {
            Value::Null => {
                target.remove(name);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                let Value::Object(t) = slot else {
                    unreachable!("made an object above")
                };
                merge(t, inner);
            }
            other => {
                target.insert(name.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(body: &str) -> String {
        reported_patch(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn a_patch_within_the_limits_is_accepted() {
        let p = reported_patch(br#"{"fw":"1.2","cfg":{"rate":5,"on":true,"tags":["a","b"]},"gone":null,"t":-4503599627370496}"#).unwrap();
        assert_eq!(p["cfg"]["rate"], 5);
    }

    #[test]
    fn each_limit_is_refused_with_its_reason_and_place() {
        assert!(error("{").contains("not JSON"));
        assert!(error("[1]").contains("not a JSON object"));
        assert!(error(r#"{"a.b":1}"#).contains("'.'"));
        assert!(error(r#"{"x":{"$v":1}}"#).contains("\"x.$v\""));
        assert!(error(r#"{"a b":1}"#).contains("' '"));
        assert!(error(r#"{"a#":1}"#).contains("'#'"));
        assert!(error(r#"{"a":[1,null]}"#).contains("a[1] is null"));
        assert!(error(r#"{"a":4503599627370497}"#).contains("2^52"));
        assert!(error(r#"{"a":18446744073709551615}"#).contains("2^52"));
        let long_string = format!(r#"{{"s":"{}"}}"#, "x".repeat(MAX_STRING_BYTES + 1));
        assert!(error(&long_string).contains("s is a string of 4097 bytes"));
        let long_name = format!(r#"{{"{}":1}}"#, "n".repeat(MAX_NAME_BYTES + 1));
        assert!(error(&long_name).contains("1025 bytes"));
        let big = format!(r#"{{"s":"{}"}}"#, "x".repeat(MAX_PATCH_BYTES));
        assert!(error(&big).contains("over the limit of 32768"));
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH {
            deep = json!({ "d": deep });
        }
        assert!(reported_patch(deep.to_string().as_bytes()).is_ok());
        let deeper = json!({ "d": deep });
        assert!(error(&deeper.to_string()).contains("deeper than 10"));
    }

    #[test]
    fn a_diff_applied_as_a_merge_patch_gives_the_new_document() {
        let old = json!({"a":1,"o":{"x":1,"y":2},"gone":"g","same":{"k":1}});
        let new = json!({"a":2,"o":{"x":1,"z":3},"same":{"k":1},"added":[1]});
        let patch = diff(old.as_object().unwrap(), new.as_object().unwrap());
        assert_eq!(
            Value::Object(patch.clone()),
            json!({"a":2,"o":{"y":null,"z":3},"gone":null,"added":[1]})
        );
        let mut doc = old.as_object().unwrap().clone();
        merge(&mut doc, &patch);
        assert_eq!(Value::Object(doc), new);
        assert!(diff(new.as_object().unwrap(), new.as_object().unwrap()).is_empty());
    }

    #[test]
    fn a_versioned_document_needs_a_version_and_keeps_the_limits() {
        let (doc, v) = versioned_document(br#"{"rate":5,"$version":3}"#).unwrap();
        assert_eq!((Value::Object(doc), v), (json!({"rate":5}), 3));
        for (body, why) in [
            (r#"{"rate":5}"#, "no $version"),
            (r#"{"$version":0}"#, "at least 1"),
            (r#"{"$version":"2"}"#, "at least 1"),
            (r#"{"$version":2,"a.b":1}"#, "'.'"),
            ("[]", "not a JSON object"),
        ] {
            let e = versioned_document(body.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn a_merge_replaces_values_merges_objects_and_removes_nulls() {
        let mut doc = json!({"a":1,"o":{"x":1,"y":2},"s":"k"});
        let patch = json!({"a":2,"o":{"y":null,"z":3},"s":null,"n":{"m":null}});
        merge(doc.as_object_mut().unwrap(), patch.as_object().unwrap());
        assert_eq!(doc, json!({"a":2,"o":{"x":1,"z":3},"n":{}}));
    }
}
