//! field-filter: passes a message only when a top-level number field of its
//! JSON body is above a threshold, and marks it with the property
//! `alert=true`. Settings: `{"field": "temperature", "above": 25}` (defaults).
//! Exports the `view-filter` world: the hub lends it every waiting message in
//! one call, it reads only each body, and copies back only the messages it
//! passes.

use std::cell::OnceCell;

use edgehub::plugin::{host, view};

wit_bindgen::generate!({ path: "../../../wit", world: "view-filter" });

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

fn keep(body: &[u8], s: &Settings) -> bool {
    let Ok(serde_json::Value::Object(body)) = serde_json::from_slice(body) else {
        return false;
    };
    match body.get(&s.field) {
        Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|v| v > s.above),
        _ => false,
    }
}

/// Message `i`'s verdict: dropped, or passed with `alert=true` added.
fn apply(i: u32, s: &Settings) -> Verdict {
    if !keep(&view::body(i), s) {
        return Verdict::Drop;
    }
    let mut m = view::to_message(i);
    m.properties.push(("alert".into(), "true".into()));
    Verdict::Replace(m)
}

struct Plugin;

impl Guest for Plugin {
    fn filter_views(count: u32) -> Vec<Verdict> {
        settings(|s| (0..count).map(|i| apply(i, s)).collect())
    }
}

export!(Plugin);
