//! Device and module twins, held by the hub for every identity so that
//! their `$iothub/twin/...` requests are answered at once, offline too.
//!
//! Owns each identity's twin (desired and reported properties, each with
//! its version), kept in the store's `twins` documents encrypted with the
//! master key: a reported patch is acknowledged only once it is durable.
//! It answers a GET from what it holds and checks and merges reported
//! patches ([`document`]); it takes desired documents from the cloud (the
//! cloud owns desired, the device owns reported) and says what changed; it
//! says which reported documents the cloud has yet to acknowledge (and
//! which to clear there, of identities that left the scope), and reads
//! back the cloud's own reported documents so versions never go back. It does not speak MQTT (the session turns
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
    /// The last reported version the cloud acknowledged.
    #[serde(default)]
    reported_acked: u64,
    /// The identity left the scope: the twin is gone, and kept only until
    /// the cloud has cleared the reported document published for it.
    #[serde(default)]
    removed: bool,
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
            reported_acked: 0,
            removed: false,
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

    /// Whether the cloud has yet to acknowledge something of this twin: a
    /// reported document (a new twin has none), or its clearing.
    fn unacknowledged(&self) -> bool {
        self.removed || (self.reported_version > 1 && self.reported_acked < self.reported_version)
    }
}

/// The twin of `id` as it stands: a new one if there is none or its
/// identity left the scope.
fn current(twins: &HashMap<String, Twin>, id: &str) -> Twin {
    twins
        .get(id)
        .filter(|t| !t.removed)
        .cloned()
        .unwrap_or_default()
}

/// A reported document for the cloud, retained on the identity's
/// reported topic: `doc` at `version`, or, with `doc` `None`, the
/// identity left the scope and the document there is to be cleared.
#[derive(Debug, Clone, PartialEq)]
pub struct ToCloud {
    pub id: String,
    pub version: u64,
    pub doc: Option<Value>,
}

/// `props` with `"$version": v` added.
pub fn with_version(props: &Map<String, Value>, v: u64) -> Value {
    let mut p = props.clone();
    p.insert("$version".into(), json!(v));
    Value::Object(p)
}

/// What a desired document from the cloud changed: the patch to push to
/// the identity's connections (empty when only the version moved), at
/// `version`.
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
        // After a start, what the cloud had not acknowledged goes up again.
        let dirty = twins
            .iter()
            .filter(|(_, t)| t.unacknowledged())
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
    /// and what changed returned (`None` when it is not newer than the one
    /// held from the cloud: nothing is stored).
    pub async fn apply_desired(
        &self,
        id: &str,
        body: &[u8],
    ) -> Result<Option<DesiredChange>, TwinsError> {
        self.readable(id)?;
        let (desired, version) = document::versioned_document(body).map_err(TwinsError::Invalid)?;
        let mut twins = self.twins.lock().await;
        let mut twin = current(&twins, id);
        if twin.desired_from_cloud && version <= twin.desired_version {
            return Ok(None);
        }
        let patch = document::diff(&twin.desired, &desired);
        twin.desired = desired;
        twin.desired_version = version;
        twin.desired_from_cloud = true;
        self.save(id, &twin).await?;
        twins.insert(id.to_string(), twin);
        Ok(Some(DesiredChange { version, patch }))
    }

    /// The desired document of `id` with its `$version`, if one came from
    /// the cloud.
    pub async fn desired_from_cloud(&self, id: &str) -> Result<Option<Value>, TwinsError> {
        self.readable(id)?;
        let twins = self.twins.lock().await;
        let twin = current(&twins, id);
        Ok(twin
            .desired_from_cloud
            .then(|| with_version(&twin.desired, twin.desired_version)))
    }

    /// Waits until the cloud has something to get (a reported document
    /// that changed, or one to clear), and returns each.
    pub async fn next_reported(&self) -> Vec<ToCloud> {
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
                        let t = twins.get(&id)?;
                        let doc = (!t.removed).then(|| t.reported_document());
                        let version = if t.removed { 0 } else { t.reported_version };
                        Some(ToCloud { id, version, doc })
                    })
                    .collect();
            }
            notified.await;
        }
    }

    /// The cloud acknowledged what [`Twins::next_reported`] handed out for
    /// `id` at `version`: remembered, so it is not sent again after a
    /// restart; a cleared document (version 0) lets a removed twin go.
    pub async fn acknowledged(&self, id: &str, version: u64) -> Result<(), TwinsError> {
        let mut twins = self.twins.lock().await;
        let Some(twin) = twins.get(id) else {
            return Ok(());
        };
        if twin.removed && version == 0 {
            let (docs, key) = (self.docs.clone(), id.to_string());
            tokio::task::spawn_blocking(move || docs.remove(&key))
                .await
                .map_err(|e| TwinsError::Invalid(format!("twin removal failed: {e}")))??;
            twins.remove(id);
            return Ok(());
        }
        if twin.removed || version <= twin.reported_acked {
            return Ok(());
        }
        let mut twin = twin.clone();
        twin.reported_acked = version;
        self.save(id, &twin).await?;
        twins.insert(id.to_string(), twin);
        Ok(())
    }

    /// A reported document of `id` read back from the cloud. One the hub
    /// sent, or older, changes nothing. A newer one (the identity reported
    /// through another edge before it moved here, or this hub lost its
    /// store) is taken as the twin's reported properties when the hub has
    /// nothing unsent; otherwise what the device reported here since wins,
    /// renumbered above the cloud's so versions never go back. Returns
    /// whether the twin changed.
    pub async fn cloud_reported(&self, id: &str, body: &[u8]) -> Result<bool, TwinsError> {
        self.readable(id)?;
        if body.is_empty() {
            // A cleared document: nothing to read back.
            return Ok(false);
        }
        let (reported, version) =
            document::versioned_document(body).map_err(TwinsError::Invalid)?;
        let mut twins = self.twins.lock().await;
        if twins.get(id).is_some_and(|t| t.removed) {
            return Ok(false);
        }
        let mut twin = current(&twins, id);
        if version <= twin.reported_version {
            return Ok(false);
        }
        let unsent = twin.reported_version > 1 && twin.reported_acked < twin.reported_version;
        if unsent {
            twin.reported_version = version + 1;
        } else {
            twin.reported = reported;
            twin.reported_version = version;
            twin.reported_acked = version;
        }
        self.save(id, &twin).await?;
        twins.insert(id.to_string(), twin);
        if unsent {
            self.reported_dirty.lock().unwrap().insert(id.to_string());
            self.reported_changed.notify_one();
        }
        Ok(true)
    }

    /// The twin of `id` as a GET answers it.
    pub async fn get(&self, id: &str) -> Result<Value, TwinsError> {
        self.readable(id)?;
        let twins = self.twins.lock().await;
        Ok(current(&twins, id).document())
    }

    /// Checks a reported patch, merges it into the twin of `id` and stores
    /// the result; returns the new reported version once it is durable.
    pub async fn patch_reported(&self, id: &str, body: &[u8]) -> Result<u64, TwinsError> {
        self.readable(id)?;
        let patch = document::reported_patch(body).map_err(TwinsError::Invalid)?;
        let mut twins = self.twins.lock().await;
        let mut twin = current(&twins, id);
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
    /// how many. One that may have a reported document on the cloud (or
    /// that could not be read) is kept as a removed twin until the cloud
    /// has cleared that document ([`Twins::next_reported`]).
    pub async fn forget_all_but(&self, keep: impl Fn(&str) -> bool) -> Result<usize, TwinsError> {
        let mut twins = self.twins.lock().await;
        let gone: Vec<(String, bool)> = {
            let unreadable = self.unreadable.lock().unwrap();
            let known = twins
                .iter()
                .filter(|(_, t)| !t.removed)
                .map(|(id, t)| (id, t.reported_version > 1));
            known
                .chain(unreadable.iter().map(|id| (id, true)))
                .filter(|(id, _)| !keep(id))
                .map(|(id, published)| (id.clone(), published))
                .collect()
        };
        if gone.is_empty() {
            return Ok(0);
        }
        let removed = Twin {
            removed: true,
            ..Twin::default()
        };
        let sealed = self
            .sealer
            .seal(&serde_json::to_vec(&removed).expect("a twin serializes"));
        let (docs, ids) = (self.docs.clone(), gone.clone());
        tokio::task::spawn_blocking(move || {
            ids.iter().try_for_each(|(id, published)| match published {
                true => docs.put(id, &sealed),
                false => docs.remove(id),
            })
        })
        .await
        .map_err(|e| TwinsError::Invalid(format!("twin removal failed: {e}")))??;
        let mut unreadable = self.unreadable.lock().unwrap();
        let mut dirty = self.reported_dirty.lock().unwrap();
        for (id, published) in &gone {
            unreadable.remove(id);
            if *published {
                twins.insert(id.clone(), removed.clone());
                dirty.insert(id.clone());
            } else {
                twins.remove(id);
                dirty.remove(id);
            }
        }
        self.reported_changed.notify_one();
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
            Some(DesiredChange {
                version: 5,
                patch: Map::new()
            })
        );
        assert_eq!(
            twins.desired_from_cloud("d1").await.unwrap(),
            Some(json!({"rate":7,"$version":5}))
        );
        assert_eq!(twins.desired_from_cloud("d2").await.unwrap(), None);
        assert_eq!(
            twins.get("d1").await.unwrap()["desired"],
            json!({"rate":7,"$version":5})
        );
        assert_eq!(
            twins.apply_desired("d1", b"{}").await.unwrap_err().status(),
            400
        );
    }

    fn to_cloud(id: &str, version: u64, doc: Option<Value>) -> ToCloud {
        ToCloud {
            id: id.into(),
            version,
            doc,
        }
    }

    #[tokio::test]
    async fn every_reported_change_is_handed_on_once_and_again_after_a_reopen_until_the_cloud_has_it(
    ) {
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
                    to_cloud("d1", 3, Some(json!({"a":1,"b":2,"$version":3}))),
                    to_cloud("d2", 2, Some(json!({"c":3,"$version":2})))
                ]
            );
            let pending =
                tokio::time::timeout(std::time::Duration::from_millis(50), twins.next_reported());
            assert!(pending.await.is_err(), "nothing more until a change");
            // The cloud acknowledged d1's document, not d2's; an older
            // acknowledgement changes nothing.
            twins.acknowledged("d1", 3).await.unwrap();
            twins.acknowledged("d1", 2).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        assert_eq!(
            twins.next_reported().await,
            vec![to_cloud("d2", 2, Some(json!({"c":3,"$version":2})))],
            "after a start, only what the cloud did not acknowledge"
        );
    }

    #[tokio::test]
    async fn a_newer_reported_document_read_back_from_the_cloud_is_taken_and_versions_never_go_back(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, sealer(dir.path())).unwrap();
        // Nothing held: the cloud's document (reported through another
        // edge, say) is taken as it is.
        assert!(twins
            .cloud_reported("d1", br#"{"fw":"1.2","$version":7}"#)
            .await
            .unwrap());
        assert_eq!(
            twins.get("d1").await.unwrap()["reported"],
            json!({"fw":"1.2","$version":7})
        );
        // Its own echo, and older ones, change nothing.
        twins
            .patch_reported("d1", br#"{"rssi":-70}"#)
            .await
            .unwrap();
        assert!(!twins
            .cloud_reported("d1", br#"{"fw":"1.2","rssi":-70,"$version":8}"#)
            .await
            .unwrap());
        assert!(!twins
            .cloud_reported("d1", br#"{"$version":3}"#)
            .await
            .unwrap());
        // A newer one while d1's version 8 is unsent: what the device
        // reported here wins, above the cloud's version.
        assert!(twins
            .cloud_reported("d1", br#"{"$version":20}"#)
            .await
            .unwrap());
        let got = twins.next_reported().await;
        assert_eq!(got.last().unwrap().version, 21);
        assert_eq!(
            twins.get("d1").await.unwrap()["reported"],
            json!({"fw":"1.2","rssi":-70,"$version":21})
        );
        // What the cloud sends is checked like any document.
        assert_eq!(
            twins
                .cloud_reported("d1", br#"{"x":1}"#)
                .await
                .unwrap_err()
                .status(),
            400
        );
        assert!(
            !twins.cloud_reported("d1", b"").await.unwrap(),
            "a cleared document"
        );
    }

    #[tokio::test]
    async fn the_twins_of_identities_no_longer_kept_are_deleted_for_good_once_the_cloud_cleared_them(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer(dir.path());
        {
            let store = Store::open(&dir.path().join("store")).unwrap();
            let twins = Twins::open(&store, sealer.clone()).unwrap();
            for id in ["a", "b", "e/m"] {
                twins.patch_reported(id, br#"{"x": 1}"#).await.unwrap();
            }
            twins
                .apply_desired("never-reported", br#"{"r":1,"$version":2}"#)
                .await
                .unwrap();
            let gone = twins.forget_all_but(|id| id == "a").await.unwrap();
            assert_eq!(gone, 3);
            assert_eq!(twins.get("b").await.unwrap()["reported"]["$version"], 1);
            assert_eq!(
                twins.next_reported().await,
                vec![
                    to_cloud("a", 2, Some(json!({"x":1,"$version":2}))),
                    to_cloud("b", 0, None),
                    to_cloud("e/m", 0, None),
                ],
                "a kept twin's document goes up, a removed one's is cleared"
            );
            assert_eq!(twins.forget_all_but(|id| id == "a").await.unwrap(), 0);
            twins.acknowledged("b", 0).await.unwrap();
        }
        let store = Store::open(&dir.path().join("store")).unwrap();
        let twins = Twins::open(&store, sealer).unwrap();
        assert_eq!(twins.get("a").await.unwrap()["reported"]["x"], 1);
        assert!(twins.get("e/m").await.unwrap()["reported"]
            .get("x")
            .is_none());
        assert_eq!(
            twins.next_reported().await,
            vec![
                to_cloud("a", 2, Some(json!({"x":1,"$version":2}))),
                to_cloud("e/m", 0, None)
            ],
            "a clearing the cloud did not acknowledge is sent again after a restart"
        );
        // Added again before the cloud cleared it: a new twin.
        assert_eq!(twins.patch_reported("e/m", br#"{"y":2}"#).await.unwrap(), 2);
        twins.acknowledged("e/m", 0).await.unwrap();
        assert_eq!(
            twins.get("e/m").await.unwrap()["reported"],
            json!({"y":2,"$version":2})
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
