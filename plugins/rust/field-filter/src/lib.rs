//! field-filter: passes a message only when a top-level number field of its
//! JSON body is above a threshold, and marks it with the property
//! `alert=true`. Settings: `{"field": "temperature", "above": 25}` (defaults).
//! Exports the `batch-filter` world, so the hub can hand it many messages in
//! one call.

use std::cell::OnceCell;

use edgehub::plugin::host;

wit_bindgen::generate!({ path: "../../../wit", world: "batch-filter" });

struct Settings {
    field: String,
    above: f64,
}

thread_local! {
    static SETTINGS: OnceCell<Settings> = const { OnceCell::new() };
}

fn settings<T>(f: impl FnOnce(&Settings) -> T) -> T {
    SETTINGS.with(|cell| {
        f(cell.get_or_init(|| {
            let v: serde_json::Value = serde_json::from_str(&host::config()).unwrap_or_default();
            Settings {
                field: v["field"].as_str().unwrap_or("temperature").to_string(),
                above: v["above"].as_f64().unwrap_or(25.0),
            }
        }))
    })
}

fn keep(m: &Message, s: &Settings) -> bool {
    let Ok(serde_json::Value::Object(body)) = serde_json::from_slice(&m.body) else {
        return false;
    };
    match body.get(&s.field) {
        Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|v| v > s.above),
        _ => false,
    }
}

fn apply(mut m: Message, s: &Settings) -> Option<Message> {
    if !keep(&m, s) {
        return None;
    }
    m.properties.push(("alert".into(), "true".into()));
    Some(m)
}

struct Plugin;

impl Guest for Plugin {
    fn filter(m: Message) -> Option<Message> {
        settings(|s| apply(m, s))
    }

    fn filter_batch(ms: Vec<Message>) -> Vec<Option<Message>> {
        settings(|s| ms.into_iter().map(|m| apply(m, s)).collect())
    }
}

export!(Plugin);
