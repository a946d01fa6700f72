//! Device and module twins, held by the hub for every identity so that
//! their `$iothub/twin/...` requests are answered at once, offline too.
//!
//! Owns each identity's twin (desired and reported properties, each with
//! its version), kept in the store's `twins` documents encrypted with the
//! master key: a reported patch is acknowledged only once it is durable.
//! It answers a GET from what it holds and checks and merges reported
//! patches ([`document`]). It does not speak MQTT (the session turns
//! requests and answers into packets, see `crate::iothub`). The hub's own
//! `$edgeHub` twin, which configures the hub, is `crate::twin`.

pub mod document;

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use crate::auth::Sealer;
use crate::store::{Documents, Store, StoreError};

/// The largest reported document a twin holds, in bytes of JSON.
pub const MAX_REPORTED_BYTES: usize = 32 * 1024;

/// Why a twin request failed; [`TwinsError::status`] is its answer's code.
#[derive(Debug, thiserror::Error)]
pub enum TwinsError {
    #[error("{0}")]
    Invalid(String),
    #[error("the twin of {0} cannot be read from the store (left as it is)")]
    Unreadable(String),
    #[error("the twin could not be stored: {0}")]
    Storage(#[from] StoreError),
}

impl TwinsError {
    /// The status a client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            TwinsError::Invalid(_) => 400,
            _ => 500,
        }
    }

    /// The answer's body: `{"message": ...}`.
    pub fn body(&self) -> Vec<u8> {
        json!({ "message": self.to_string() })
            .to_string()
            .into_bytes()
    }
}

/// One identity's twin as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Twin {
    desired: Map<String, Value>,
    desired_version: u64,
    reported: Map<String, Value>,
    reported_version: u64,
}

impl Default for Twin {
    fn default() -> Self {
        // IoT Hub starts both versions at 1.
        Twin {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
        }
    }
}

impl Twin {
    /// The document a GET answers: `{desired, reported}`, each with its
    /// `$version`.
    fn document(&self) -> Value {
        let with_version = |props: &Map<String, Value>, v: u64| {
            let mut p = props.clone();
            p.insert("$version".into(), json!(v));
            Value::Object(p)
        };
        json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": with_version(&self.reported, self.reported_version),
        })
    }
}

pub struct Twins {
    docs: Documents,
    sealer: Sealer,
    /// Every twin, by identity (`device` or `device/module`).
    twins: Mutex<HashMap<String, Twin>>,
    /// Stored twins the key could not open or that are not a twin: never
    /// overwritten, answered with an error.
    unreadable: HashSet<String>,
}

impl Twins {
    /// Loads every stored twin.
    pub fn open(store: &Store, sealer: Sealer) -> Result<Self, StoreError> {
        let docs = store.documents("twins")?;
        let mut twins = HashMap::new();
        let mut unreadable = HashSet::new();
        for (id, sealed) in docs.all()? {
            let twin = sealer
                .open(&sealed)
                .and_then(|plain| serde_json::from_slice::<Twin>(&plain).ok());
            match twin {
                Some(t) => {
                    twins.insert(id, t);
                }
                None => {
                    tracing::error!(identity = %id, "a stored twin cannot be read (wrong master key or damaged); it is kept as it is and its requests fail");
                    unreadable.insert(id);
                }
            }
        }
        if !twins.is_empty() {
            tracing::info!(twins = twins.len(), "twins loaded from the store");
        }
        Ok(Twins {
            docs,
            sealer,
            twins: Mutex::new(twins),
            unreadable,
        })
    }

    /// The twin of `id` as a GET answers it.
    pub async fn get(&self, id: &str) -> Result<Value, TwinsError> {
        self.readable(id)?;
        let twins = self.twins.lock().await;
        Ok(twins.get(id).cloned().unwrap_or_default().document())
    }

    /// Checks a reported patch, merges it into the twin of `id` and stores
    /// the result; returns the new reported version once it is durable.
    pub async fn patch_reported(&self, id: &str, body: &[u8]) -> Result<u64, TwinsError> {
        self.readable(id)?;
        let patch = document::reported_patch(body).map_err(TwinsError::Invalid)?;
        let mut twins = self.twins.lock().await;
        let mut twin = twins.get(id).cloned().unwrap_or_default();
        document::merge(&mut twin.reported, &patch);
        let size = serde_json::to_vec(&twin.reported).map_or(0, |v| v.len());
        if size > MAX_REPORTED_BYTES {
            return Err(TwinsError::Invalid(format!(
                "the reported properties would be {size} bytes, over the limit of {MAX_REPORTED_BYTES}"
            )));
        }
        twin.reported_version += 1;
        self.save(id, &twin).await?;
        let version = twin.reported_version;
        twins.insert(id.to_string(), twin);
        Ok(version)
    }

    fn readable(&self, id: &str) -> Result<(), TwinsError> {
        if self.unreadable.contains(id) {
            return Err(TwinsError::Unreadable(id.into()));
        }
        Ok(())
    }

    /// Stores `twin` durably, off the async runtime.
    async fn save(&self, id: &str, twin: &Twin) -> Result<(), TwinsError> {
        let plain = serde_json::to_vec(twin).expect("a twin serializes");
        let sealed = self.sealer.seal(&plain);
        let (docs, id) = (self.docs.clone(), id.to_string());
        tokio::task::spawn_blocking(move || docs.put(&id, &sealed))
            .await
            .map_err(|e| TwinsError::Invalid(format!("twin write failed: {e}")))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(dir: &std::path::Path) -> Sealer {
        // The key lands beside `keys`, inside the test's folder.
        crate::auth::ScopeCache::open(&dir.join("keys"), None)
            .unwrap()
            .sealer()
    }

    #[tokio::test]
    async fn a_new_twin_is_empty_at_version_1_and_a_patch_moves_reported_to_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        let doc = twins.get("d1").await.unwrap();
        assert_eq!(
            doc,
            json!({"desired":{"$version":1},"reported":{"$version":1}})
        );
        let v = twins
            .patch_reported("d1", br#"{"fw":"1.0","cfg":{"a":1,"b":2}}"#)
            .await
            .unwrap();
        assert_eq!(v, 2);
        let v = twins
            .patch_reported("d1", br#"{"cfg":{"a":null}}"#)
            .await
            .unwrap();
        assert_eq!(v, 3);
        assert_eq!(
            twins.get("d1").await.unwrap()["reported"],
            json!({"fw":"1.0","cfg":{"b":2},"$version":3})
        );
        assert_eq!(twins.get("d2").await.unwrap()["reported"]["$version"], 1);
    }

    #[tokio::test]
    async fn reported_properties_survive_a_reopen_and_are_not_stored_in_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let twins = Twins::open(&store, sealer(dir.path())).unwrap();
            twins
                .patch_reported("d1/m1", br#"{"secretish":"needle-4242"}"#)
                .await
                .unwrap();
        }
        let mut found = false;
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).unwrap();
            found |= bytes.windows(11).any(|w| w == b"needle-4242");
        }
        assert!(!found, "a twin is stored encrypted");
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        let doc = twins.get("d1/m1").await.unwrap();
        assert_eq!(doc["reported"]["secretish"], "needle-4242");
        assert_eq!(doc["reported"]["$version"], 2);
    }

    #[tokio::test]
    async fn an_invalid_patch_changes_nothing_and_a_twin_has_a_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        let e = twins
            .patch_reported("d1", b"{\"a.b\":1}")
            .await
            .unwrap_err();
        assert_eq!(e.status(), 400);
        let chunk = format!(r#"{{"k{{}}":"{}"}}"#, "x".repeat(4000));
        let mut last = Ok(0);
        for i in 0..9 {
            last = twins
                .patch_reported("d1", chunk.replace("{}", &i.to_string()).as_bytes())
                .await;
        }
        let e = last.unwrap_err();
        assert!(e.to_string().contains("over the limit of 32768"), "{e}");
        assert_eq!(
            twins.get("d1").await.unwrap()["reported"]["$version"],
            9,
            "eight patches were taken, the ninth and the invalid one were not"
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
