//! The cloud's identity registry, as the scope documents of every edge
//! (retained on `edges/{edge}/scope`) make it up: who is a child of which
//! edge, which modules each edge has, and their credentials.
//!
//! Owns the rules of an edit (a device has one parent, an edge device is
//! nobody's child, ids and keys as the hub takes them) and which documents
//! an edit changes. A document that does not parse is kept aside with its
//! reason: edits of other edges go on, edits of that edge are refused. An
//! identity found in two scopes (a `set-parent` interrupted between its two
//! publishes) can only be moved to one of them or removed. Pure: reading
//! and publishing the documents is the caller's; the hub applies them with
//! the same types (`auth::scope`).

use std::collections::BTreeMap;

use crate::auth::scope::{self, AuthDoc, Document, IdentityDoc};
use crate::protocol::{edge_of_scope, scope_topic};

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
    /// Edges whose retained document does not parse, with the reason.
    pub unreadable: BTreeMap<String, String>,
}

impl Registry {
    /// Reads the documents retained under `edges/+/scope`; one that does
    /// not parse goes to [`Registry::unreadable`].
    pub fn read<'a>(documents: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut r = Registry::default();
        for (topic, body) in documents {
            let Some(edge) = edge_of_scope(topic) else {
                continue;
            };
            match serde_json::from_slice::<Document>(body) {
                Ok(doc) => {
                    r.scopes.insert(edge.to_string(), doc);
                }
                Err(e) => {
                    r.unreadable.insert(edge.to_string(), e.to_string());
                }
            }
        }
        r
    }

    /// Refuses an edit that would publish `edge`'s document over one that
    /// does not parse (what it held would be lost).
    pub fn check_readable(&self, edge: &str) -> Result<(), CloudError> {
        match self.unreadable.get(edge) {
            None => Ok(()),
            Some(why) => Err(CloudError::Refused(format!(
                "the scope document of edge {edge} on {topic} is not valid ({why}): fix it, or clear it with `mosquitto_pub -r -n -t {topic}` and add the edge again",
                topic = scope_topic(edge)
            ))),
        }
    }

    /// The edges whose scope holds `name` (more than one only after an
    /// interrupted `set-parent`).
    fn edges_of(&self, name: &str) -> Vec<String> {
        self.scopes
            .iter()
            .filter(|(_, doc)| doc.identities.iter().any(|e| e.name() == name))
            .map(|(edge, _)| edge.clone())
            .collect()
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

    /// `name`'s edge and entry, for a change of that one entry: refused
    /// while `name` is in two scopes.
    fn find_mut(&mut self, name: &str) -> Result<(String, &mut IdentityDoc), CloudError> {
        let edges = self.edges_of(name);
        if edges.len() > 1 {
            return Err(CloudError::Refused(format!(
                "{name} is in the scopes of {} (a set-parent was interrupted): `edgehub cloud scope set-parent {name} {}` finishes it",
                edges.join(" and "),
                edges[0]
            )));
        }
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
            self.check_readable(&edge)?;
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
        let edges = self.edges_of(device);
        if edges.len() > 1 && edges.iter().any(|e| e == parent) {
            // Finishing an interrupted move: it stays where it was going.
            let others: Vec<String> = edges.into_iter().filter(|e| e != parent).collect();
            for edge in &others {
                let doc = self.scopes.get_mut(edge).expect("found above");
                doc.identities.retain(|e| e.name() != device);
                self.bump(edge);
            }
            return Ok(others);
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

    /// Removes an identity (from every scope that holds it). Returns the
    /// edges to publish.
    pub fn remove(&mut self, name: &str) -> Result<Vec<String>, CloudError> {
        let edges = self.edges_of(name);
        if edges.is_empty() {
            return Err(CloudError::NotFound(format!(
                "{name} is in no edge's scope"
            )));
        }
        for edge in &edges {
            let doc = self.scopes.get_mut(edge).expect("found above");
            doc.identities.retain(|e| e.name() != name);
            self.bump(edge);
        }
        Ok(edges)
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
    fn an_unreadable_document_is_set_aside_and_only_edits_of_its_edge_are_refused() {
        let good = serde_json::to_vec(&registry().scopes["edge1"]).unwrap();
        let r = Registry::read([
            ("edges/edge1/scope", &good[..]),
            ("edges/edge2/scope", &b"{\"version\": \"x\"}"[..]),
            ("edges/edge3/scope", &b"\xff\xfe not json"[..]),
            ("edges/a/b/scope", &b"ignored"[..]),
        ]);
        assert_eq!(r.scopes.keys().collect::<Vec<_>>(), ["edge1"]);
        assert_eq!(r.unreadable.keys().collect::<Vec<_>>(), ["edge2", "edge3"]);
        assert!(r.find("child1").is_some());
        assert!(r.check_readable("edge1").is_ok());
        let e = r.check_readable("edge2").unwrap_err().to_string();
        assert!(
            e.contains("edges/edge2/scope") && e.contains("mosquitto_pub -r -n"),
            "{e}"
        );
    }

    #[test]
    fn an_interrupted_move_is_finished_by_set_parent_and_refused_by_other_edits() {
        let mut r = registry();
        // The new parent's document was published, the old one's was not.
        let mut moved = r.clone();
        moved.set_parent("child1", "edge2").unwrap();
        r.scopes
            .insert("edge2".into(), moved.scopes["edge2"].clone());
        assert_eq!(r.edges_of("child1"), ["edge1", "edge2"]);

        let e = r.rotate("child1", Which::Both).unwrap_err().to_string();
        assert!(
            e.contains("edge1 and edge2") && e.contains("set-parent child1"),
            "{e}"
        );
        let e = r.set_parent("child1", "edge3").unwrap_err().to_string();
        assert!(e.contains("interrupted"), "{e}");

        let version = r.scopes["edge1"].version;
        assert_eq!(r.set_parent("child1", "edge2").unwrap(), ["edge1"]);
        assert_eq!(r.edges_of("child1"), ["edge2"]);
        assert_eq!(r.scopes["edge1"].version, version + 1);

        // removing a duplicated identity removes every copy
        let mut twice = moved.clone();
        twice
            .scopes
            .insert("edge1".into(), registry().scopes["edge1"].clone());
        assert_eq!(twice.remove("child1").unwrap(), ["edge1", "edge2"]);
        assert!(twice.find("child1").is_none());
    }
}
