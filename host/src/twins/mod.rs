//! Device and module twins, held by the hub for every identity so that
//! their `$iothub/twin/...` requests are answered at once, offline too.
//!
//! Owns each identity's twin (desired and reported properties, each with
//! its version), kept in the store's `twins` documents encrypted with the
//! master key: a reported patch is acknowledged only once it is durable.
//! It answers a GET from what it holds and checks and merges reported
//! patches ([`document`]); it takes desired documents from the cloud (the
//! cloud owns desired, the device owns reported) and says what changed, and
//! which reported documents the cloud has yet to get. It does not speak MQTT (the session turns
//! requests and answers into packets, see `crate::iothub`). The hub's own
//! `$edgeHub` twin, which configures the hub, is `crate::twin`.

pub mod document;

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, Notify};

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
    /// Whether `desired` came from the cloud (before, any version the
    /// cloud sends is taken; after, only a higher one).
    #[serde(default)]
    desired_from_cloud: bool,
    reported: Map<String, Value>,
    reported_version: u64,
}

impl Default for Twin {
    fn default() -> Self {
        // IoT Hub starts both versions at 1.
        Twin {
            desired: Map::new(),
            desired_version: 1,
            desired_from_cloud: false,
            reported: Map::new(),
            reported_version: 1,
        }
    }
}

impl Twin {
    /// The document a GET answers: `{desired, reported}`, each with its
    /// `$version`.
    fn document(&self) -> Value {
        json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": self.reported_document(),
        })
    }

    /// The reported properties with their `$version`, as the cloud gets them.
    fn reported_document(&self) -> Value {
        with_version(&self.reported, self.reported_version)
    }
}

/// `props` with `"$version": v` added.
pub fn with_version(props: &Map<String, Value>, v: u64) -> Value {
    let mut p = props.clone();
    p.insert("$version".into(), json!(v));
    Value::Object(p)
}

/// What a desired document from the cloud changed: the patch to push to
/// the identity's connections (never empty), at `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredChange {
    pub version: u64,
    pub patch: Map<String, Value>,
}

pub struct Twins {
    docs: Documents,
    sealer: Sealer,
    /// Every twin, by identity (`device` or `device/module`).
    twins: Mutex<HashMap<String, Twin>>,
    /// Stored twins the key could not open or that are not a twin: never
    /// overwritten, answered with an error (removed with their identity).
    unreadable: std::sync::Mutex<HashSet<String>>,
    /// Identities whose reported properties changed and are not yet handed
    /// to the upstream ([`Twins::next_reported`]).
    reported_dirty: std::sync::Mutex<BTreeSet<String>>,
    reported_changed: Notify,
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
        // After a start, every reported document goes up again: the cloud
        // may not have had the last one.
        let dirty = twins
            .iter()
            .filter(|(_, t)| t.reported_version > 1)
            .map(|(id, _)| id.clone())
            .collect();
        Ok(Twins {
            docs,
            sealer,
            twins: Mutex::new(twins),
            unreadable: std::sync::Mutex::new(unreadable),
            reported_dirty: std::sync::Mutex::new(dirty),
            reported_changed: Notify::new(),
        })
    }

    /// Takes a desired document from the cloud for `id`: checked, stored,
    /// and what changed returned (`None` when nothing did, or when it is
    /// older than the one held).
    pub async fn apply_desired(
        &self,
        id: &str,
        body: &[u8],
    ) -> Result<Option<DesiredChange>, TwinsError> {
        self.readable(id)?;
        let (desired, version) = document::desired_document(body).map_err(TwinsError::Invalid)?;
        let mut twins = self.twins.lock().await;
        let mut twin = twins.get(id).cloned().unwrap_or_default();
        if twin.desired_from_cloud && version <= twin.desired_version {
            return Ok(None);
        }
        let patch = document::diff(&twin.desired, &desired);
        twin.desired = desired;
        twin.desired_version = version;
        twin.desired_from_cloud = true;
        self.save(id, &twin).await?;
        twins.insert(id.to_string(), twin);
        Ok((!patch.is_empty()).then_some(DesiredChange { version, patch }))
    }

    /// Waits until some identity's reported properties changed, and returns
    /// each such identity with its reported document (`$version` included).
    pub async fn next_reported(&self) -> Vec<(String, Value)> {
        loop {
            let notified = self.reported_changed.notified();
            if !self.reported_dirty.lock().unwrap().is_empty() {
                // Taken only once nothing is awaited any more: cancelling
                // this call loses no change.
                let twins = self.twins.lock().await;
                let ids = std::mem::take(&mut *self.reported_dirty.lock().unwrap());
                return ids
                    .into_iter()
                    .filter_map(|id| {
                        let doc = twins.get(&id)?.reported_document();
                        Some((id, doc))
                    })
                    .collect();
            }
            notified.await;
        }
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
        self.reported_dirty.lock().unwrap().insert(id.to_string());
        self.reported_changed.notify_one();
        Ok(version)
    }

    /// Deletes the twins of every identity `keep` says no to (identities
    /// removed from the device scope), in memory and in the store; returns
    /// how many.
    pub async fn forget_all_but(&self, keep: impl Fn(&str) -> bool) -> Result<usize, TwinsError> {
        let mut twins = self.twins.lock().await;
        let gone: Vec<String> = {
            let unreadable = self.unreadable.lock().unwrap();
            twins
                .keys()
                .chain(unreadable.iter())
                .filter(|id| !keep(id))
                .cloned()
                .collect()
        };
        if gone.is_empty() {
            return Ok(0);
        }
        let (docs, ids) = (self.docs.clone(), gone.clone());
        tokio::task::spawn_blocking(move || ids.iter().try_for_each(|id| docs.remove(id)))
            .await
            .map_err(|e| TwinsError::Invalid(format!("twin removal failed: {e}")))??;
        let mut unreadable = self.unreadable.lock().unwrap();
        let mut dirty = self.reported_dirty.lock().unwrap();
        for id in &gone {
            twins.remove(id);
            unreadable.remove(id);
            dirty.remove(id);
        }
        Ok(gone.len())
    }

    fn readable(&self, id: &str) -> Result<(), TwinsError> {
        if self.unreadable.lock().unwrap().contains(id) {
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

    #[tokio::test]
    async fn desired_from_the_cloud_is_diffed_against_what_is_held_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        // The cloud's first document is taken whatever its version.
        let c = twins
            .apply_desired("d1", br#"{"rate":5,"mode":"eco","$version":1}"#)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.version, Value::Object(c.patch)),
            (1, json!({"rate":5,"mode":"eco"}))
        );
        let c = twins
            .apply_desired("d1", br#"{"rate":7,"$version":4}"#)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.version, Value::Object(c.patch)),
            (4, json!({"rate":7,"mode":null}))
        );
        for stale in [
            &br#"{"rate":1,"$version":3}"#[..],
            br#"{"rate":7,"$version":4}"#,
        ] {
            assert_eq!(twins.apply_desired("d1", stale).await.unwrap(), None);
        }
        // A newer version with the same properties: nothing to push.
        assert_eq!(
            twins
                .apply_desired("d1", br#"{"rate":7,"$version":5}"#)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            twins.get("d1").await.unwrap()["desired"],
            json!({"rate":7,"$version":5})
        );
        assert_eq!(
            twins.apply_desired("d1", b"{}").await.unwrap_err().status(),
            400
        );
    }

    #[tokio::test]
    async fn every_reported_change_is_handed_on_once_and_again_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let twins = Twins::open(&store, sealer(dir.path())).unwrap();
            twins.patch_reported("d1", br#"{"a":1}"#).await.unwrap();
            twins.patch_reported("d1", br#"{"b":2}"#).await.unwrap();
            twins.patch_reported("d2", br#"{"c":3}"#).await.unwrap();
            let got = twins.next_reported().await;
            assert_eq!(
                got,
                vec![
                    ("d1".to_string(), json!({"a":1,"b":2,"$version":3})),
                    ("d2".to_string(), json!({"c":3,"$version":2}))
                ]
            );
            let pending =
                tokio::time::timeout(std::time::Duration::from_millis(50), twins.next_reported());
            assert!(pending.await.is_err(), "nothing more until a change");
        }
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        assert_eq!(
            twins.next_reported().await.len(),
            2,
            "all again after a start"
        );
    }

    #[tokio::test]
    async fn the_twins_of_identities_no_longer_kept_are_deleted_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer(dir.path());
        {
            let store = Store::open(&dir.path().join("store")).unwrap();
            let twins = Twins::open(&store, sealer.clone()).unwrap();
            for id in ["a", "b", "e/m"] {
                twins.patch_reported(id, br#"{"x": 1}"#).await.unwrap();
            }
            let gone = twins.forget_all_but(|id| id == "a").await.unwrap();
            assert_eq!(gone, 2);
            assert_eq!(twins.get("b").await.unwrap()["reported"]["$version"], 1);
            let reported: Vec<String> = twins
                .next_reported()
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert_eq!(
                reported,
                ["a"],
                "a removed twin's reported document still goes up"
            );
            assert_eq!(twins.forget_all_but(|id| id == "a").await.unwrap(), 0);
        }
        let store = Store::open(&dir.path().join("store")).unwrap();
        let twins = Twins::open(&store, sealer).unwrap();
        assert_eq!(twins.get("a").await.unwrap()["reported"]["x"], 1);
        assert!(twins.get("e/m").await.unwrap()["reported"]
            .get("x")
            .is_none());
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
