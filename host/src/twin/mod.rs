//! The hub's own twin (`devices/{edge}/modules/$edgeHub/twin/desired`):
//! routes, the default time to live and plugin settings, set from the cloud.
//!
//! Owns applying a desired document (all of it or none of it: a document
//! with any error is refused and the previous settings stay) and the
//! reported document (what is applied, and why the last desired one was
//! refused, if it was). The document in force is kept by `twins`, as the
//! desired properties of the identity `{edge}/$edgeHub`, like every twin's:
//! encrypted in the store, checked with the same limits, and only ever
//! replaced by a newer `$version`, so an offline restart comes back with it
//! and an old document delivered again (a cluster node's stale retained
//! copy) never rolls the settings back. It does not talk to the cloud:
//! `upstream::sync` hands it desired documents and publishes what it
//! reports.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::plugins::Registry;
use crate::protocol;
use crate::routing::rules::RouteTable;
use crate::routing::Routes;
use crate::twins::{Twins, TwinsError};

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
    #[error("{0}")]
    Twins(#[from] TwinsError),
}

impl TwinError {
    /// The code reported for it.
    fn status(&self) -> u16 {
        match self {
            TwinError::Twins(e) => e.status(),
            _ => 400,
        }
    }
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
    /// `{edge}/$edgeHub`, its name in `twins`.
    identity: String,
    twins: Arc<Twins>,
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
    /// Builds the twin and puts in force the desired document `twins`
    /// holds for it, if any. One that no longer applies (settings of an
    /// older hub) is reported and ignored. A `hub-twin.json` an older hub
    /// left in `storage` is moved into `twins` first.
    pub async fn open(
        storage: &Path,
        edge_id: &str,
        twins: Arc<Twins>,
        baseline: Baseline,
        routes: Routes,
        ttl_ms: Arc<AtomicU64>,
        registry: Arc<Registry>,
    ) -> (Arc<HubTwin>, watch::Receiver<Option<Value>>) {
        let (reported, rx) = watch::channel(None);
        let identity = protocol::hub_twin_identity(edge_id);
        let twin = Arc::new(HubTwin {
            identity,
            twins,
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
        twin.adopt_legacy_cache(&storage.join("hub-twin.json"))
            .await;
        match twin.twins.desired_from_cloud(&twin.identity).await {
            Ok(Some(doc)) => {
                let bytes = serde_json::to_vec(&doc).expect("a document serializes");
                match HubTwin::check(&bytes) {
                    Ok(desired) => {
                        tracing::info!(version = ?desired.version, "hub twin restored from the store");
                        twin.put_in_force(desired, &bytes);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the stored hub twin no longer applies; the configured settings stay");
                        let mut state = twin.state.lock().unwrap();
                        state.status = (400, e.to_string());
                        state.version = doc.get("$version").and_then(Value::as_i64);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot read the stored hub twin; the configured settings stay");
                twin.state.lock().unwrap().status = (e.status(), e.to_string());
            }
        }
        twin.report();
        (twin, rx)
    }

    /// Moves the plain-text cache of an older hub into `twins`.
    async fn adopt_legacy_cache(&self, path: &Path) {
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let held = self.twins.desired_from_cloud(&self.identity).await;
        if matches!(held, Ok(None)) {
            if let Err(e) = self.twins.apply_desired(&self.identity, &bytes).await {
                tracing::error!(path = %path.display(), error = %e, "an older hub's twin cache cannot be taken over; it is left as it is");
                return;
            }
        }
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "an older hub's twin cache moved into the store")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "an older hub's twin cache cannot be removed")
            }
        }
    }

    /// Applies a desired document from the cloud: checked, kept by `twins`
    /// (which takes only a newer `$version` than the one in force), put in
    /// force, and reported. A refused one is reported with why, and the
    /// settings in force stay.
    pub async fn apply(&self, payload: &[u8]) -> Result<(), TwinError> {
        let result = self.take(payload).await;
        if let Err(e) = &result {
            let version = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v.get("$version").and_then(Value::as_i64));
            let mut state = self.state.lock().unwrap();
            state.status = (e.status(), e.to_string());
            state.version = version.or(state.version);
        }
        self.report();
        result
    }

    async fn take(&self, payload: &[u8]) -> Result<(), TwinError> {
        let desired = Self::check(payload)?;
        match self.twins.apply_desired(&self.identity, payload).await {
            Ok(Some(_)) => {
                tracing::info!(version = ?desired.version, "hub twin desired properties applied");
                self.put_in_force(desired, payload);
                Ok(())
            }
            // The one in force delivered again (a reconnect), or an older
            // one: nothing changes.
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
    use std::collections::HashMap;

    use crate::plugins::{Limits, PluginEngine};
    use crate::store::Store;

    /// A hub twin over the store in `dir` (kept alive by the caller).
    async fn open(dir: &Path) -> (Store, Arc<HubTwin>, Arc<AtomicU64>) {
        let store = Store::open(&dir.join("store")).unwrap();
        let sealer = crate::auth::ScopeCache::open(&dir.join("keys"), None)
            .unwrap()
            .sealer();
        let twins = Arc::new(Twins::open(&store, sealer).unwrap());
        let engine = PluginEngine::new(None).unwrap();
        let registry = Registry::new(
            engine,
            HashMap::new(),
            Limits::default(),
            u64::MAX,
            Arc::default(),
        )
        .unwrap();
        let ttl_ms = Arc::new(AtomicU64::new(60_000));
        let baseline = Baseline {
            routes: None,
            ttl_secs: 60,
        };
        let (twin, _) = HubTwin::open(
            dir,
            "edge",
            twins,
            baseline,
            Routes::new(None),
            ttl_ms.clone(),
            Arc::new(registry),
        )
        .await;
        (store, twin, ttl_ms)
    }

    fn ttl(v: u64, secs: u64) -> Vec<u8> {
        json!({"$version": v, "storeAndForwardConfiguration": {"timeToLiveSecs": secs}})
            .to_string()
            .into_bytes()
    }

    #[tokio::test]
    async fn the_document_in_force_comes_back_after_a_restart_and_an_older_one_never_rolls_it_back()
    {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_store, twin, ttl_ms) = open(dir.path()).await;
            twin.apply(&ttl(2, 100)).await.unwrap();
            assert_eq!(ttl_ms.load(Ordering::Relaxed), 100_000);
            // A stale copy delivered again (an older version) changes nothing.
            twin.apply(&ttl(1, 5)).await.unwrap();
            assert_eq!(ttl_ms.load(Ordering::Relaxed), 100_000);
            let e = twin.apply(br#"{"$version": 3, "colour": 1}"#).await;
            assert!(e.unwrap_err().to_string().contains("colour"));
            let reported = twin.reported_document();
            assert_eq!(reported["lastDesiredVersion"], 3);
            assert_eq!(reported["lastDesiredStatus"]["code"], 400);
            // Past the twin limits every twin has: refused the same way.
            let deep = br#"{"$version": 4, "plugins": {"p": {"config": {"a.b": 1}}}}"#;
            assert_eq!(twin.apply(deep).await.unwrap_err().status(), 400);
        }
        let (_store, twin, ttl_ms) = open(dir.path()).await;
        assert_eq!(ttl_ms.load(Ordering::Relaxed), 100_000, "restored");
        assert_eq!(twin.reported_document()["lastDesiredVersion"], 2);
        assert!(!dir.path().join("hub-twin.json").exists());
    }

    #[tokio::test]
    async fn an_older_hubs_plain_text_cache_is_moved_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("hub-twin.json");
        std::fs::write(&legacy, ttl(4, 7)).unwrap();
        {
            let (_store, _twin, ttl_ms) = open(dir.path()).await;
            assert_eq!(ttl_ms.load(Ordering::Relaxed), 7_000);
            assert!(!legacy.exists(), "the plain-text cache is gone");
        }
        let (_store, _twin, ttl_ms) = open(dir.path()).await;
        assert_eq!(
            ttl_ms.load(Ordering::Relaxed),
            7_000,
            "and kept in the store"
        );
    }

    fn error_of(doc: &str) -> String {
        match HubTwin::check(doc.as_bytes()) {
            Ok(_) => panic!("accepted: {doc}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_example_desired_document_is_valid() {
        let d = HubTwin::check(include_bytes!("../../../examples/hub-twin-desired.json")).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.routes.unwrap().1.routes().len(), 2);
        assert_eq!(d.ttl_secs, Some(7200));
        assert!(d.plugin_configs.contains_key("content-router"));
    }

    #[test]
    fn every_problem_of_a_desired_document_is_named() {
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
