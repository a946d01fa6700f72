//! The hub's own twin (`devices/{edge}/modules/$edgeHub/twin/desired`):
//! routes, the default time to live and plugin settings, set from the cloud.
//!
//! Owns applying a desired document (all of it or none of it: a document
//! with any error is refused and the previous settings stay), caching the
//! last applied one durably so an offline restart comes back with it, and
//! the reported document (what is applied, and why the last desired one was
//! refused, if it was). It does not talk to the cloud: `upstream::sync`
//! hands it desired documents and the forwarder publishes what it reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::plugins::Registry;
use crate::protocol;
use crate::routing::rules::RouteTable;
use crate::routing::Routes;

/// The cloud topic of the hub's desired properties.
pub fn desired_topic(edge_id: &str) -> String {
    protocol::twin_topic(&protocol::hub_twin_identity(edge_id), "desired")
}

/// The cloud topic of the hub's reported properties.
pub fn reported_topic(edge_id: &str) -> String {
    protocol::twin_topic(&protocol::hub_twin_identity(edge_id), "reported")
}

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    #[error("desired properties are not a JSON object: {0}")]
    NotJson(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot cache the hub twin in {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the hub runs with when the twin says nothing.
#[derive(Clone)]
pub struct Baseline {
    pub routes: Option<RouteTable>,
    pub ttl_secs: u64,
}

/// A desired document, checked.
struct Desired {
    version: Option<i64>,
    routes: Option<(Value, RouteTable)>,
    ttl_secs: Option<u64>,
    plugin_configs: BTreeMap<String, Value>,
}

pub struct HubTwin {
    cache_path: PathBuf,
    baseline: Baseline,
    routes: Routes,
    ttl_ms: Arc<AtomicU64>,
    registry: Arc<Registry>,
    state: Mutex<State>,
    reported: watch::Sender<Option<Value>>,
}

#[derive(Default)]
struct State {
    applied: Option<Value>,
    version: Option<i64>,
    status: (u16, String),
}

impl HubTwin {
    /// Builds the twin and applies the cached desired document, if any. A
    /// cache that no longer applies is reported and ignored.
    pub fn open(
        storage: &Path,
        baseline: Baseline,
        routes: Routes,
        ttl_ms: Arc<AtomicU64>,
        registry: Arc<Registry>,
    ) -> (Arc<HubTwin>, watch::Receiver<Option<Value>>) {
        let (reported, rx) = watch::channel(None);
        let twin = Arc::new(HubTwin {
            cache_path: storage.join("hub-twin.json"),
            baseline,
            routes,
            ttl_ms,
            registry,
            state: Mutex::new(State {
                status: (200, String::new()),
                ..State::default()
            }),
            reported,
        });
        match std::fs::read(&twin.cache_path) {
            Ok(bytes) => match HubTwin::check(&bytes) {
                Ok(desired) => {
                    tracing::info!(version = ?desired.version, "hub twin restored from cache");
                    twin.put_in_force(desired, &bytes);
                }
                Err(e) => {
                    tracing::error!(path = %twin.cache_path.display(), error = %e, "cached hub twin refused");
                    let mut state = twin.state.lock().unwrap();
                    state.status = (400, e.to_string());
                    state.version = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v.get("$version").and_then(Value::as_i64));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %twin.cache_path.display(), error = %e, "cannot read cached hub twin")
            }
        }
        twin.report();
        (twin, rx)
    }

    /// Applies a desired document from the cloud, caches it, and reports.
    pub fn apply(&self, payload: &[u8]) -> Result<(), TwinError> {
        let desired = match Self::check(payload) {
            Ok(d) => d,
            Err(e) => {
                let version = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| v.get("$version").and_then(Value::as_i64));
                let mut state = self.state.lock().unwrap();
                state.status = (400, e.to_string());
                state.version = version.or(state.version);
                drop(state);
                self.report();
                return Err(e);
            }
        };
        if self.state.lock().unwrap().applied.as_ref()
            == serde_json::from_slice::<Value>(payload).ok().as_ref()
        {
            // The document in force again (a reconnect, or a refused one
            // taken back): nothing changes but the status.
            let mut state = self.state.lock().unwrap();
            state.status = (200, String::new());
            state.version = desired.version;
            drop(state);
            self.report();
            return Ok(());
        }
        if let Err(source) = crate::durable_file::replace(&self.cache_path, payload) {
            let e = TwinError::Cache {
                path: self.cache_path.clone(),
                source,
            };
            let mut state = self.state.lock().unwrap();
            state.status = (500, e.to_string());
            state.version = desired.version;
            drop(state);
            self.report();
            return Err(e);
        }
        tracing::info!(version = ?desired.version, "hub twin desired properties applied");
        self.put_in_force(desired, payload);
        self.report();
        Ok(())
    }

    /// Checks a desired document as [`HubTwin::apply`] would, applying
    /// nothing (the cloud side checks a deployment before publishing it).
    pub fn validate(payload: &[u8]) -> Result<(), TwinError> {
        Self::check(payload).map(|_| ())
    }

    /// Checks a desired document without applying anything.
    fn check(payload: &[u8]) -> Result<Desired, TwinError> {
        let doc: Value =
            serde_json::from_slice(payload).map_err(|e| TwinError::NotJson(e.to_string()))?;
        let Value::Object(obj) = &doc else {
            return Err(TwinError::NotJson("not an object".into()));
        };
        let mut errors = Vec::new();
        let routes = match obj.get("routes") {
            None | Some(Value::Null) => None,
            Some(r) => match RouteTable::from_json(r) {
                Ok(t) => Some((r.clone(), t)),
                Err(errs) => {
                    for (name, e) in errs {
                        errors.push(format!("routes.{name}: {e}"));
                    }
                    None
                }
            },
        };
        let ttl_secs = match doc.pointer("/storeAndForwardConfiguration/timeToLiveSecs") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(s) if s > 0 => Some(s),
                _ => {
                    errors.push(format!(
                        "storeAndForwardConfiguration.timeToLiveSecs: {v} is not a positive whole number"
                    ));
                    None
                }
            },
        };
        let mut plugin_configs = BTreeMap::new();
        match obj.get("plugins") {
            None | Some(Value::Null) => {}
            Some(Value::Object(p)) => {
                for (name, entry) in p {
                    match entry.get("config") {
                        Some(c) if entry.as_object().is_some_and(|o| o.len() == 1) => {
                            plugin_configs.insert(name.clone(), c.clone());
                        }
                        _ => errors.push(format!(
                            "plugins.{name}: expected {{\"config\": …}} and nothing else"
                        )),
                    }
                }
            }
            Some(_) => errors.push("plugins: expected an object".into()),
        }
        for key in obj.keys() {
            let known = [
                "$version",
                "schemaVersion",
                "routes",
                "storeAndForwardConfiguration",
                "plugins",
            ];
            if !known.contains(&key.as_str()) {
                errors.push(format!("unknown property {key:?}"));
            }
        }
        if !errors.is_empty() {
            return Err(TwinError::Invalid(errors.join("; ")));
        }
        Ok(Desired {
            version: obj.get("$version").and_then(Value::as_i64),
            routes,
            ttl_secs,
            plugin_configs,
        })
    }

    fn put_in_force(&self, desired: Desired, payload: &[u8]) {
        let table = match desired.routes {
            Some((_, t)) => Some(t),
            None => self.baseline.routes.clone(),
        };
        self.routes.set(table);
        let ttl = desired.ttl_secs.unwrap_or(self.baseline.ttl_secs);
        self.ttl_ms
            .store(ttl.saturating_mul(1000), Ordering::Relaxed);
        self.registry.set_twin_configs(desired.plugin_configs);
        let mut state = self.state.lock().unwrap();
        state.applied = serde_json::from_slice(payload).ok();
        state.version = desired.version;
        state.status = (200, String::new());
    }

    /// Publishes the reported document if it changed (plugins come and go,
    /// so the hub calls this now and then too).
    pub fn report(&self) {
        let doc = self.reported_document();
        self.reported.send_if_modified(|cur| {
            if cur.as_ref() == Some(&doc) {
                return false;
            }
            *cur = Some(doc);
            true
        });
    }

    fn reported_document(&self) -> Value {
        let state = self.state.lock().unwrap();
        // `null`: no route table, every upstream-bound message goes upstream.
        let routes: Option<serde_json::Map<String, Value>> = self.routes.table().map(|t| {
            t.routes()
                .iter()
                .map(|r| {
                    let on_error = match r.on_error {
                        crate::routing::rules::OnError::Pass => "pass",
                        crate::routing::rules::OnError::Drop => "drop",
                        crate::routing::rules::OnError::DeadLetter => "deadletter",
                    };
                    let mut v =
                        json!({"route": r.text, "priority": r.priority, "onError": on_error});
                    if let Some(ttl) = r.ttl_secs {
                        v["timeToLiveSecs"] = json!(ttl);
                    }
                    let missing: Vec<String> = r
                        .sink
                        .plugins()
                        .into_iter()
                        .filter(|p| self.registry.get(p).is_none())
                        .map(|p| format!("plugin {p:?} is not loaded"))
                        .collect();
                    if !missing.is_empty() {
                        v["warning"] = json!(missing.join("; "));
                    }
                    (r.name.clone(), v)
                })
                .collect()
        });
        json!({
            "schemaVersion": "1.1",
            "lastDesiredVersion": state.version,
            "lastDesiredStatus": {"code": state.status.0, "description": state.status.1},
            "routes": routes,
            "storeAndForwardConfiguration": {
                "timeToLiveSecs": self.ttl_ms.load(Ordering::Relaxed) / 1000
            },
            "plugins": self.registry.status(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(doc: &str) -> String {
        match HubTwin::check(doc.as_bytes()) {
            Ok(_) => panic!("accepted: {doc}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_example_versioned_document_is_valid() {
        let d = HubTwin::check(include_bytes!("../../../examples/hub-twin-desired.json")).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.routes.unwrap().1.routes().len(), 2);
        assert_eq!(d.ttl_secs, Some(7200));
        assert!(d.plugin_configs.contains_key("content-router"));
    }

    #[test]
    fn every_problem_of_a_versioned_document_is_named() {
        let e = error_of(
            r#"{"routes":{"r1":"FROM /messages/* INTO $nowhere"},"storeAndForwardConfiguration":{"timeToLiveSecs":0},"plugins":{"p":{"limits":1}},"extra":1}"#,
        );
        assert!(e.contains("routes.r1: column 23"), "{e}");
        assert!(e.contains("timeToLiveSecs: 0"), "{e}");
        assert!(e.contains("plugins.p"), "{e}");
        assert!(e.contains("unknown property \"extra\""), "{e}");
        assert!(error_of("[1,2]").contains("not a JSON object"));
        assert!(error_of("{").contains("not a JSON object"));
    }

    #[test]
    fn a_document_without_settings_is_valid_and_means_the_config_defaults() {
        let d = HubTwin::check(br#"{"$version": 4}"#).unwrap();
        assert!(d.routes.is_none() && d.ttl_secs.is_none() && d.plugin_configs.is_empty());
    }
}
