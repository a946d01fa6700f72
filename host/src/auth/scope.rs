//! The device scope: which identities may connect to this hub, and how they
//! prove it. Parsed from the cloud's JSON document and checked against the
//! parent/child rules; an identity that breaks a rule is left out with a
//! reason, the rest apply.
//!
//! Document (retained on the upstream topic `edges/{edge}/scope`):
//! ```json
//! {"version": 1, "identities": [
//!   {"deviceId": "child1", "parent": "EDGE", "auth": {"type": "sas", "primaryKey": "…", "secondaryKey": "…"}},
//!   {"deviceId": "EDGE", "moduleId": "filter", "auth": {"type": "sas", "primaryKey": "…", "secondaryKey": "…"}}
//! ]}
//! ```

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("scope document is not valid: {0}")]
    Invalid(String),
}

/// The scope document as the cloud publishes it: the hub reads it, the
/// cloud side (`edgehub cloud`) writes it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub version: u64,
    pub identities: Vec<IdentityDoc>,
}

/// One identity of a scope document.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDoc {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edge: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub auth: AuthDoc,
}

impl IdentityDoc {
    /// `{device}` or `{device}/{module}`: the client id it connects with.
    pub fn name(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// How an identity of a scope document authenticates.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AuthDoc {
    #[serde(rename_all = "camelCase")]
    Sas {
        primary_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_key: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    X509Thumbprint {
        primary_thumbprint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_thumbprint: Option<String>,
    },
    X509Ca,
}

/// A fresh random symmetric key (32 bytes, base64), as IoT Hub makes them.
pub fn new_key() -> String {
    use rand::RngCore;
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// How one identity authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Symmetric keys (decoded), primary first.
    Sas(Vec<Vec<u8>>),
    /// Certificate thumbprints (lower-case hex of SHA-256 or SHA-1).
    Thumbprints(Vec<String>),
    /// A certificate chaining to a configured CA.
    Ca,
}

/// The identities this hub may authenticate, by client id.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub version: u64,
    pub identities: HashMap<String, (Identity, Credentials)>,
}

impl Scope {
    /// Parses `doc` for the hub `edge_id`. Returns the scope and, for each
    /// identity left out, why.
    pub fn parse(edge_id: &str, doc: &[u8]) -> Result<(Self, Vec<String>), ScopeError> {
        let doc: Document =
            serde_json::from_slice(doc).map_err(|e| ScopeError::Invalid(e.to_string()))?;
        let mut scope = Scope {
            version: doc.version,
            identities: HashMap::new(),
        };
        let mut rejected = Vec::new();
        for entry in doc.identities {
            let identity = Identity {
                device_id: entry.device_id.clone(),
                module_id: entry.module_id.clone(),
            };
            let name = identity.client_id();
            match check(edge_id, &entry) {
                Ok(credentials) => match scope.identities.entry(name) {
                    Entry::Occupied(e) => rejected.push(format!(
                        "{}: listed twice; the first entry is kept",
                        e.key()
                    )),
                    Entry::Vacant(e) => {
                        e.insert((identity, credentials));
                    }
                },
                Err(why) => rejected.push(format!("{name}: {why}")),
            }
        }
        Ok((scope, rejected))
    }

    pub fn get(&self, client_id: &str) -> Option<&(Identity, Credentials)> {
        self.identities.get(client_id)
    }
}

/// Whether `e` may be in the scope of `edge_id` (the parent/child rules, ids,
/// keys and thumbprints), and its credentials if so; else why not.
pub fn check(edge_id: &str, e: &IdentityDoc) -> Result<Credentials, String> {
    let valid_id = |s: &str| !s.is_empty() && s.len() <= 128 && !s.contains(['/', '+', '#', '\0']);
    if !valid_id(&e.device_id) || e.module_id.as_deref().is_some_and(|m| !valid_id(m)) {
        return Err("invalid device or module id".into());
    }
    if e.module_id.as_deref().is_some_and(|m| m.starts_with('$')) {
        // `$edgeHub` is the hub itself (its twin is the hub's), `$edgeAgent`
        // the runtime's: as in IoT Hub, no module of a scope takes such a name.
        return Err("module ids starting with $ are the system's ($edgeHub, $edgeAgent)".into());
    }
    match &e.module_id {
        Some(_) if e.device_id != edge_id => {
            return Err(format!(
                "a module of device {}, not of this edge ({edge_id})",
                e.device_id
            ))
        }
        Some(_) => {}
        None if e.device_id == edge_id => {
            return Err("the edge device itself is not a downstream identity".into())
        }
        None if e.edge => return Err("an edge device cannot be a child device".into()),
        None => match e.parent.as_deref() {
            Some(p) if p == edge_id => {}
            Some(p) => return Err(format!("its parent is {p}, not this edge ({edge_id})")),
            None => return Err("a child device needs a parent".into()),
        },
    }
    Ok(match &e.auth {
        AuthDoc::Sas {
            primary_key,
            secondary_key,
        } => {
            let decode = |k: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .ok()
                    .filter(|k| !k.is_empty())
            };
            let mut keys = vec![decode(primary_key).ok_or("primaryKey is not base64")?];
            if let Some(k) = secondary_key {
                keys.push(decode(k).ok_or("secondaryKey is not base64")?);
            }
            Credentials::Sas(keys)
        }
        AuthDoc::X509Thumbprint {
            primary_thumbprint,
            secondary_thumbprint,
        } => {
            let norm = |t: &str| {
                let t = t.replace(':', "").to_ascii_lowercase();
                let hex =
                    (t.len() == 40 || t.len() == 64) && t.bytes().all(|b| b.is_ascii_hexdigit());
                hex.then_some(t)
            };
            let mut prints = vec![norm(primary_thumbprint)
                .ok_or("primaryThumbprint is not a SHA-1/SHA-256 hex digest")?];
            if let Some(t) = secondary_thumbprint {
                prints
                    .push(norm(t).ok_or("secondaryThumbprint is not a SHA-1/SHA-256 hex digest")?);
            }
            Credentials::Thumbprints(prints)
        }
        AuthDoc::X509Ca => Credentials::Ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"version": 3, "identities": [
        {"deviceId": "child1", "parent": "edge", "auth": {"type": "sas", "primaryKey": "a2V5MQ==", "secondaryKey": "a2V5Mg=="}},
        {"deviceId": "edge", "moduleId": "filter", "auth": {"type": "sas", "primaryKey": "a2V5Mw=="}},
        {"deviceId": "edge2", "edge": true, "parent": "edge", "auth": {"type": "sas", "primaryKey": "a2V5NA=="}},
        {"deviceId": "orphan", "auth": {"type": "sas", "primaryKey": "a2V5NA=="}},
        {"deviceId": "elsewhere", "parent": "other", "auth": {"type": "sas", "primaryKey": "a2V5NA=="}},
        {"deviceId": "other", "moduleId": "m", "auth": {"type": "sas", "primaryKey": "a2V5NA=="}},
        {"deviceId": "badkey", "parent": "edge", "auth": {"type": "sas", "primaryKey": "***"}},
        {"deviceId": "cert1", "parent": "edge", "auth": {"type": "x509Thumbprint", "primaryThumbprint": "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"}},
        {"deviceId": "edge", "moduleId": "$edgeHub", "auth": {"type": "sas", "primaryKey": "a2V5NQ=="}}
    ]}"#;

    #[test]
    fn children_and_modules_of_this_edge_are_in_scope_and_rule_breakers_are_not() {
        let (scope, rejected) = Scope::parse("edge", DOC.as_bytes()).unwrap();
        let mut names: Vec<_> = scope.identities.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["cert1", "child1", "edge/filter"]);
        assert_eq!(scope.version, 3);
        assert_eq!(
            scope.get("child1").unwrap().1,
            Credentials::Sas(vec![b"key1".to_vec(), b"key2".to_vec()])
        );
        assert_eq!(rejected.len(), 6, "{rejected:?}");
        assert!(rejected
            .iter()
            .any(|r| r.contains("module ids starting with $ are the system's")));
        assert!(rejected
            .iter()
            .any(|r| r.starts_with("edge2: an edge device cannot be a child")));
        assert!(rejected
            .iter()
            .any(|r| r.starts_with("elsewhere: its parent is other")));
    }

    #[test]
    fn a_document_that_is_not_json_or_misses_fields_is_refused_whole() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"version": 1}"#,
            r#"{"version": 1, "identities": [{"deviceId": "x"}]}"#,
        ] {
            assert!(Scope::parse("edge", bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
