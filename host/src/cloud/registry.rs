//! The cloud's identity registry, as the scope documents of every edge
//! (retained on `edges/{edge}/scope`) make it up: who is a child of which
//! edge, which modules each edge has, and their credentials.
//!
//! Owns the rules of an edit (a device has one parent, an edge device is
//! nobody's child, ids and keys as the hub takes them) and which documents
//! an edit changes. Pure: reading and publishing the documents is the
//! caller's; the hub applies them with the same types (`auth::scope`).

use std::collections::BTreeMap;

use crate::auth::scope::{self, AuthDoc, Document, IdentityDoc};

use super::CloudError;

/// Which key `rotate` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Primary,
    Secondary,
    Both,
}

/// The scope documents of every edge on the broker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    pub scopes: BTreeMap<String, Document>,
}

/// The topic of an edge's scope document.
pub fn scope_topic(edge: &str) -> String {
    format!("edges/{edge}/scope")
}

/// The edge a scope topic names.
pub fn edge_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("edges/")?
        .strip_suffix("/scope")
        .filter(|e| !e.is_empty() && !e.contains('/'))
}

impl Registry {
    /// Reads the documents retained under `edges/+/scope`.
    pub fn read<'a>(
        documents: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, CloudError> {
        let mut scopes = BTreeMap::new();
        for (topic, body) in documents {
            let Some(edge) = edge_of(topic) else { continue };
            let doc: Document = serde_json::from_slice(body).map_err(|e| {
                CloudError::Invalid(format!("the scope document on {topic} is not valid: {e}"))
            })?;
            scopes.insert(edge.to_string(), doc);
        }
        Ok(Registry { scopes })
    }

    /// The edge whose scope holds `name` (`{device}` or `{edge}/{module}`),
    /// and its entry.
    pub fn find(&self, name: &str) -> Option<(&str, &IdentityDoc)> {
        self.scopes.iter().find_map(|(edge, doc)| {
            doc.identities
                .iter()
                .find(|e| e.name() == name)
                .map(|e| (edge.as_str(), e))
        })
    }

    fn find_mut(&mut self, name: &str) -> Result<(String, &mut IdentityDoc), CloudError> {
        self.scopes
            .iter_mut()
            .find_map(|(edge, doc)| {
                doc.identities
                    .iter_mut()
                    .find(|e| e.name() == name)
                    .map(|e| (edge.clone(), e))
            })
            .ok_or_else(|| CloudError::NotFound(format!("{name} is in no edge's scope")))
    }

    fn bump(&mut self, edge: &str) {
        if let Some(doc) = self.scopes.get_mut(edge) {
            doc.version += 1;
        }
    }

    /// Registers an edge device: an empty scope of its own. Returns the
    /// edge to publish.
    pub fn add_edge(&mut self, edge: &str) -> Result<String, CloudError> {
        if self.scopes.contains_key(edge) {
            return Err(CloudError::Refused(format!("edge {edge} already exists")));
        }
        if let Some((parent, _)) = self.find(edge) {
            return Err(CloudError::Refused(format!(
                "{edge} is a child device of {parent}: remove it there first (a child device cannot be an edge)"
            )));
        }
        check_id(edge)?;
        self.scopes.insert(
            edge.to_string(),
            Document {
                version: 1,
                identities: Vec::new(),
            },
        );
        Ok(edge.to_string())
    }

    /// Adds `name` (`{device}`: a child of `parent`; `{edge}/{module}`: a
    /// module of that edge) with `auth`. Returns the edge to publish.
    pub fn add(
        &mut self,
        name: &str,
        parent: Option<&str>,
        auth: AuthDoc,
    ) -> Result<String, CloudError> {
        let entry = match name.split_once('/') {
            Some((edge, module)) => {
                if parent.is_some_and(|p| p != edge) {
                    return Err(CloudError::Refused(format!(
                        "{name} is a module of {edge}: it has no other parent"
                    )));
                }
                IdentityDoc {
                    device_id: edge.to_string(),
                    module_id: Some(module.to_string()),
                    edge: false,
                    parent: None,
                    auth,
                }
            }
            None => {
                let Some(parent) = parent else {
                    return Err(CloudError::Invalid(format!(
                        "{name}: a child device needs --parent (its edge)"
                    )));
                };
                IdentityDoc {
                    device_id: name.to_string(),
                    module_id: None,
                    edge: false,
                    parent: Some(parent.to_string()),
                    auth,
                }
            }
        };
        let edge = entry
            .parent
            .clone()
            .unwrap_or_else(|| entry.device_id.clone());
        if let Some((other, _)) = self.find(name) {
            return Err(CloudError::Refused(match entry.module_id {
                Some(_) => format!("{name} already exists"),
                None if other == edge => format!("{name} is already a child of {other}"),
                None => format!(
                    "{name} is already a child of {other}, and a device has one parent: `edgehub cloud scope set-parent {name} {edge}` moves it"
                ),
            }));
        }
        if entry.module_id.is_none() && self.scopes.contains_key(name) {
            return Err(CloudError::Refused(format!(
                "{name} is an edge device (it has a scope of its own), and an edge device cannot be a child device"
            )));
        }
        if !self.scopes.contains_key(&edge) {
            return Err(CloudError::NotFound(format!(
                "no edge {edge}: `edgehub cloud scope add-edge {edge}` registers it"
            )));
        }
        scope::check(&edge, &entry).map_err(|why| CloudError::Refused(format!("{name}: {why}")))?;
        let doc = self.scopes.get_mut(&edge).expect("checked above");
        doc.identities.push(entry);
        self.bump(&edge);
        Ok(edge)
    }

    /// Moves child device `device` to `parent`, keeping its credentials.
    /// Returns the edges to publish: the new parent first, so the device is
    /// never in no scope at all.
    pub fn set_parent(&mut self, device: &str, parent: &str) -> Result<Vec<String>, CloudError> {
        if device.contains('/') {
            return Err(CloudError::Refused(format!(
                "{device} is a module: it belongs to its edge"
            )));
        }
        let (old, entry) = self.find_mut(device)?;
        if old == parent {
            return Err(CloudError::Refused(format!(
                "{device} is already a child of {parent}"
            )));
        }
        let auth = entry.auth.clone();
        self.remove(device)?;
        let new = self.add(device, Some(parent), auth)?;
        Ok(vec![new, old])
    }

    /// New random keys for a SAS identity. Returns the edge to publish.
    pub fn rotate(&mut self, name: &str, which: Which) -> Result<String, CloudError> {
        let (edge, entry) = self.find_mut(name)?;
        let AuthDoc::Sas {
            primary_key,
            secondary_key,
        } = &mut entry.auth
        else {
            return Err(CloudError::Refused(format!(
                "{name} signs in with a certificate: it has no keys to rotate"
            )));
        };
        if which != Which::Secondary {
            *primary_key = scope::new_key();
        }
        if which != Which::Primary {
            *secondary_key = Some(scope::new_key());
        }
        self.bump(&edge);
        Ok(edge)
    }

    /// Removes an identity. Returns the edge to publish.
    pub fn remove(&mut self, name: &str) -> Result<String, CloudError> {
        let (edge, _) = self.find_mut(name)?;
        let doc = self.scopes.get_mut(&edge).expect("found above");
        doc.identities.retain(|e| e.name() != name);
        self.bump(&edge);
        Ok(edge)
    }
}

/// Whether `a` and `b` agree on `name`: the same entry in the same edge's
/// scope (or in none), or, for an edge, both know it.
pub fn same_for(a: &Registry, b: &Registry, name: &str) -> bool {
    a.find(name) == b.find(name) && a.scopes.contains_key(name) == b.scopes.contains_key(name)
}

fn check_id(id: &str) -> Result<(), CloudError> {
    let ok = !id.is_empty() && id.len() <= 128 && !id.contains(['/', '+', '#', '\0']);
    ok.then_some(())
        .ok_or_else(|| CloudError::Invalid(format!("{id:?} is not a valid device id")))
}

/// A fresh SAS identity's credentials.
pub fn new_sas() -> AuthDoc {
    AuthDoc::Sas {
        primary_key: scope::new_key(),
        secondary_key: Some(scope::new_key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut r = Registry::default();
        r.add_edge("edge1").unwrap();
        r.add_edge("edge2").unwrap();
        r.add("child1", Some("edge1"), new_sas()).unwrap();
        r.add("edge1/filter", None, new_sas()).unwrap();
        r
    }

    #[test]
    fn added_identities_land_in_their_edges_scope_and_the_hub_would_take_them() {
        let r = registry();
        let doc = &r.scopes["edge1"];
        assert_eq!(doc.version, 3, "one bump per edit after the first version");
        let body = serde_json::to_vec(doc).unwrap();
        let (scope, rejected) = crate::auth::scope::Scope::parse("edge1", &body).unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        assert!(scope.get("child1").is_some() && scope.get("edge1/filter").is_some());
        assert_eq!(r.find("child1").map(|(e, _)| e), Some("edge1"));
    }

    #[test]
    fn a_second_parent_is_refused_with_the_way_to_move_the_device() {
        let mut r = registry();
        let e = r
            .add("child1", Some("edge2"), new_sas())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("already a child of edge1") && e.contains("set-parent"),
            "{e}"
        );
        assert!(r.scopes["edge2"].identities.is_empty());
    }

    #[test]
    fn an_edge_device_is_refused_as_a_child_and_a_child_as_an_edge() {
        let mut r = registry();
        let e = r
            .add("edge2", Some("edge1"), new_sas())
            .unwrap_err()
            .to_string();
        assert!(e.contains("edge2 is an edge device"), "{e}");
        let e = r.add_edge("child1").unwrap_err().to_string();
        assert!(e.contains("child device of edge1"), "{e}");
    }

    #[test]
    fn set_parent_moves_the_device_with_its_keys_and_names_both_edges() {
        let mut r = registry();
        let before = r.find("child1").unwrap().1.auth.clone();
        assert_eq!(r.set_parent("child1", "edge2").unwrap(), ["edge2", "edge1"]);
        let (edge, entry) = r.find("child1").unwrap();
        assert_eq!((edge, &entry.auth), ("edge2", &before));
        assert_eq!(entry.parent.as_deref(), Some("edge2"));
        assert!(r.set_parent("child1", "edge2").is_err());
        assert!(r.set_parent("child1", "nowhere").is_err());
    }

    #[test]
    fn rotation_replaces_only_the_key_asked_for() {
        let mut r = registry();
        let keys = |r: &Registry| match &r.find("child1").unwrap().1.auth {
            AuthDoc::Sas {
                primary_key,
                secondary_key,
            } => (primary_key.clone(), secondary_key.clone()),
            _ => unreachable!(),
        };
        let (p, s) = keys(&r);
        r.rotate("child1", Which::Secondary).unwrap();
        let (p2, s2) = keys(&r);
        assert_eq!(p, p2);
        assert_ne!(s, s2);
    }

    #[test]
    fn unknown_identities_edges_and_bad_ids_are_named() {
        let mut r = registry();
        assert!(matches!(r.remove("ghost"), Err(CloudError::NotFound(_))));
        assert!(matches!(
            r.add("lost", Some("nowhere"), new_sas()),
            Err(CloudError::NotFound(_))
        ));
        assert!(r.add("a+b", Some("edge1"), new_sas()).is_err());
        assert!(r.add("edge1/x", Some("edge2"), new_sas()).is_err());
        r.remove("child1").unwrap();
        assert!(r.find("child1").is_none());
    }

    #[test]
    fn scope_topics_name_their_edge() {
        assert_eq!(edge_of(&scope_topic("e1")), Some("e1"));
        assert_eq!(edge_of("edges/a/b/scope"), None);
        assert_eq!(edge_of("edges//scope"), None);
    }
}
