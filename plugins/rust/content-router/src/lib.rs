//! content-router: picks destinations from a field of the JSON body.
//! Settings (defaults shown):
//! `{"field": "level", "routes": {"critical": ["upstream", "alerts/input1"],
//!   "debug": []}, "default": ["upstream"]}`
//! A destination is `upstream`, `drop`, or `module/input` (a module's input).
//! Messages whose body is not JSON, or has no such field, take `default`.

use std::cell::OnceCell;

use edgehub::plugin::host;

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct Settings {
    field: String,
    routes: serde_json::Map<String, serde_json::Value>,
    default: Vec<Endpoint>,
}

thread_local! {
    static SETTINGS: OnceCell<Settings> = const { OnceCell::new() };
}

fn endpoints(v: &serde_json::Value) -> Vec<Endpoint> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| e.as_str())
        .map(|e| match e {
            "upstream" => Endpoint::Upstream,
            "drop" => Endpoint::Drop,
            other => match other.split_once('/') {
                Some((m, i)) => Endpoint::ModuleInput((m.to_string(), i.to_string())),
                None => Endpoint::Drop,
            },
        })
        .collect()
}

fn load() -> Settings {
    let v: serde_json::Value = serde_json::from_str(&host::config()).unwrap_or_default();
    let routes = match v.get("routes").and_then(|r| r.as_object()) {
        Some(r) => r.clone(),
        None => serde_json::json!({"critical": ["upstream", "alerts/input1"], "debug": []})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let default = match v.get("default") {
        Some(d) => endpoints(d),
        None => vec![Endpoint::Upstream],
    };
    Settings {
        field: v["field"].as_str().unwrap_or("level").to_string(),
        routes,
        default,
    }
}

struct Plugin;

impl Guest for Plugin {
    fn route(m: Message) -> Vec<Endpoint> {
        SETTINGS.with(|cell| {
            let s = cell.get_or_init(load);
            let body: Option<serde_json::Value> = serde_json::from_slice(&m.body).ok();
            let value = body
                .as_ref()
                .and_then(|b| b.get(&s.field))
                .and_then(|v| v.as_str());
            match value.and_then(|v| s.routes.get(v)) {
                Some(r) => endpoints(r),
                None => s.default.clone(),
            }
        })
    }
}

export!(Plugin);
