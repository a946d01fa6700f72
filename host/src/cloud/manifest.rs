//! Deployment manifests for `edgehub cloud deploy`: the Azure IoT Edge
//! shape (`modulesContent.$edgeHub["properties.desired"]`), or that object
//! alone, read and checked before anything is published.
//!
//! Owns finding the hub's desired properties in a manifest and pointing
//! each error at its line and column in the file. The rules themselves are
//! the hub's (`twin::HubTwin::validate`, the route parser): one definition.

use serde_json::{Map, Value};

use super::CloudError;
use crate::routing::rules::RouteTable;
use crate::twin::HubTwin;

/// The hub's desired properties in `text` (without `$version`), checked as
/// the hub will check them. `file` names the manifest in errors.
pub fn hub_desired(file: &str, text: &str) -> Result<Map<String, Value>, CloudError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| CloudError::Invalid(format!("{file}:{}:{}: {e}", e.line(), e.column())))?;
    let desired = doc
        .pointer("/modulesContent/$edgeHub/properties.desired")
        .or_else(|| doc.pointer("/$edgeHub/properties.desired"))
        .unwrap_or(&doc);
    let Value::Object(desired) = desired else {
        return Err(CloudError::Invalid(format!(
            "{file}: the hub's desired properties are not a JSON object"
        )));
    };
    let mut desired = desired.clone();
    desired.remove("$version");
    let mut errors = Vec::new();
    if let Some(routes) = desired.get("routes") {
        if let Err(errs) = RouteTable::from_json(routes) {
            for (name, e) in errs {
                let (line, column) = locate(text, &name, e.position);
                errors.push(format!(
                    "{file}:{line}:{column}: routes.{name}: {}",
                    e.message
                ));
            }
        }
    }
    if errors.is_empty() {
        let body = serde_json::to_vec(&desired).expect("a JSON object serialises");
        if let Err(e) = HubTwin::validate(&body) {
            errors.push(format!("{file}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(desired)
    } else {
        Err(CloudError::Invalid(errors.join("\n")))
    }
}

/// Line and column (1-based) in `text` of column `position` of the route
/// named `name`: the route is the first string after `"name":`. Without a
/// position, the name itself. Best effort: (0, 0) when not found.
fn locate(text: &str, name: &str, position: usize) -> (usize, usize) {
    let key = format!("\"{name}\"");
    let Some(at) = text
        .match_indices(&key)
        .map(|(i, _)| i)
        .find(|&i| text[i + key.len()..].trim_start().starts_with(':'))
    else {
        return (0, 0);
    };
    let mut target = at;
    if position > 0 {
        if let Some(open) = route_text_start(text, at + key.len()) {
            target = open + raw_offset(&text[open..], position - 1);
        }
    }
    let line = text[..target].matches('\n').count() + 1;
    let line_start = text[..target].rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..target].chars().count() + 1)
}

/// The byte offset in a JSON string's raw text (after its opening quote)
/// of its `chars`-th decoded character: an escape (`\"`, `\n`, `\u00e9`)
/// is one character of the route but several in the file.
fn raw_offset(raw: &str, chars: usize) -> usize {
    let mut at = 0;
    for _ in 0..chars {
        let rest = &raw[at..];
        let step = match rest.strip_prefix('\\') {
            Some(e) if e.starts_with('u') => {
                // A surrogate pair is two escapes for one character.
                let pair = e.get(5..7) == Some("\\u")
                    && e.get(1..2).is_some_and(|h| matches!(h, "d" | "D"));
                if pair {
                    12
                } else {
                    6
                }
            }
            Some(_) => 2,
            None => rest.chars().next().map_or(0, char::len_utf8),
        };
        if step == 0 {
            break;
        }
        at = (at + step).min(raw.len());
    }
    at
}

/// Where the route text begins (after its opening quote) for the entry
/// whose value starts after `from`: `"..."` or `{..., "route": "...", ...}`.
fn route_text_start(text: &str, from: usize) -> Option<usize> {
    let colon = from + text[from..].find(':')? + 1;
    let value = colon + (text[colon..].len() - text[colon..].trim_start().len());
    let quote = if text[value..].starts_with('{') {
        let key = value + text[value..].find("\"route\"")? + "\"route\"".len();
        let colon = key + text[key..].find(':')? + 1;
        colon + text[colon..].find('"')?
    } else {
        value
    };
    text[quote..].starts_with('"').then_some(quote + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{
  "modulesContent": {
    "$edgeHub": {
      "properties.desired": {
        "schemaVersion": "1.1",
        "routes": {
          "up": "FROM /messages/* INTO $upstream",
          "bad": {"route": "FROM /messages/* INT $upstream", "priority": 2}
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
      }
    }
  }
}"#;

    #[test]
    fn a_route_error_points_at_its_line_and_column_in_the_manifest() {
        let e = hub_desired("m.json", MANIFEST).unwrap_err().to_string();
        let mut parts = e.splitn(4, ':');
        assert_eq!(parts.next(), Some("m.json"));
        assert_eq!(parts.next(), Some("8"), "{e}");
        let column: usize = parts.next().unwrap().parse().unwrap();
        let line: String = MANIFEST
            .lines()
            .nth(7)
            .unwrap()
            .chars()
            .skip(column - 1)
            .collect();
        assert!(line.starts_with("INT $upstream"), "{e} points at {line:?}");
        assert!(parts.next().unwrap().starts_with(" routes.bad: "), "{e}");
    }

    #[test]
    fn a_column_after_escapes_counts_the_characters_of_the_file() {
        let text =
            "{\"routes\": {\"r\": \"FROM /messages/* WHERE a = \\\"x\\\" INTOO $upstream\"}}";
        let e = hub_desired("e.json", text).unwrap_err().to_string();
        let column: usize = e.split(':').nth(2).unwrap().parse().unwrap();
        let rest: String = text.chars().skip(column - 1).collect();
        assert!(rest.starts_with("INTOO"), "{e} points at {rest:?}");
        assert_eq!(raw_offset("\\u00e9x", 1), 6);
        assert_eq!(raw_offset("\\ud83d\\ude00x", 1), 12);
        assert_eq!(raw_offset("é\\nx", 2), 4);
    }

    #[test]
    fn the_hubs_desired_properties_are_found_in_either_shape_and_checked() {
        let good = MANIFEST.replace("INT $upstream", "INTO $upstream");
        let d = hub_desired("m.json", &good).unwrap();
        assert_eq!(d["storeAndForwardConfiguration"]["timeToLiveSecs"], 7200);
        let bare = r#"{"routes": {"r": "FROM /messages/* INTO $upstream"}, "$version": 9}"#;
        let d = hub_desired("m.json", bare).unwrap();
        assert!(d.get("$version").is_none());
        let e = hub_desired("m.json", r#"{"routes": {}, "colour": 1}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = hub_desired("m.json", "{\n  \"routes\": [1,\n").unwrap_err();
        assert!(e.to_string().starts_with("m.json:3:"), "{e}");
    }
}
