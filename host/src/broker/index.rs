//! Which clients subscribe to what, as a trie of filter levels: a publish
//! visits only the filters that can match its topic (its own levels, `+`
//! and `#` at each), not every client.
//!
//! Owns no session state: the broker's clients keep their subscriptions
//! (what the store keeps); this mirrors them, and the broker keeps the two
//! in step.

use std::collections::HashMap;

/// Subscriptions by filter, each a client id and the QoS it was granted.
#[derive(Default)]
pub struct Index {
    root: Node,
    len: usize,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Clients whose filter ends at this level.
    clients: HashMap<Box<str>, u8>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.clients.is_empty()
    }
}

impl Index {
    /// Subscriptions held, all clients together.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds `client`'s subscription to `filter` (a valid filter), or
    /// changes its QoS.
    pub fn insert(&mut self, filter: &str, client: &str, qos: u8) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.clients.insert(client.into(), qos).is_none() {
            self.len += 1;
        }
    }

    /// Removes `client`'s subscription to `filter`, and the levels it
    /// leaves empty.
    pub fn remove(&mut self, filter: &str, client: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        if remove(&mut self.root, &levels, client) {
            self.len -= 1;
        }
    }

    /// Every client with a subscription matching `topic`, with the highest
    /// QoS among its matching subscriptions, added to `out`.
    pub fn matches<'a>(&'a self, topic: &str, out: &mut HashMap<&'a str, u8>) {
        let levels: Vec<&str> = topic.split('/').collect();
        // A topic starting with `$` is not matched by a leading wildcard.
        let system = topic.starts_with('$');
        collect(&self.root, &levels, !system, out);
    }
}

/// Whether the subscription was there to remove.
fn remove(node: &mut Node, levels: &[&str], client: &str) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.clients.remove(client).is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove(child, rest, client);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn collect<'a>(node: &'a Node, levels: &[&str], wildcards: bool, out: &mut HashMap<&'a str, u8>) {
    if wildcards {
        // `a/#` matches `a` itself and everything below it.
        if let Some(all) = node.children.get("#") {
            add(all, out);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        add(node, out);
        return;
    };
    if let Some(exact) = node.children.get(*first) {
        collect(exact, rest, true, out);
    }
    if wildcards {
        if let Some(any) = node.children.get("+") {
            collect(any, rest, true, out);
        }
    }
}

fn add<'a>(node: &'a Node, out: &mut HashMap<&'a str, u8>) {
    for (client, &qos) in &node.clients {
        let best = out.entry(client).or_insert(qos);
        *best = (*best).max(qos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;

    fn matching(index: &Index, topic: &str) -> Vec<(String, u8)> {
        let mut out = HashMap::new();
        index.matches(topic, &mut out);
        let mut v: Vec<_> = out.into_iter().map(|(c, q)| (c.to_string(), q)).collect();
        v.sort();
        v
    }

    #[test]
    fn a_publish_reaches_the_clients_whose_filters_match_at_their_best_qos() {
        let mut index = Index::default();
        index.insert("a/+/c", "one", 0);
        index.insert("a/#", "one", 2);
        index.insert("a/b", "two", 1);
        index.insert("#", "three", 1);
        assert_eq!(
            matching(&index, "a/b/c"),
            [("one".into(), 2), ("three".into(), 1)]
        );
        assert_eq!(
            matching(&index, "a/b"),
            [("one".into(), 2), ("three".into(), 1), ("two".into(), 1)]
        );
        assert_eq!(
            matching(&index, "a"),
            [("one".into(), 2), ("three".into(), 1)],
            "a/# matches its parent level"
        );
        assert!(
            matching(&index, "$SYS/a").is_empty(),
            "no leading wildcard matches $ topics"
        );
    }

    #[test]
    fn removing_subscriptions_prunes_the_trie_and_keeps_the_count() {
        let mut index = Index::default();
        index.insert("a/b/c", "one", 1);
        index.insert("a/b/c", "one", 2);
        index.insert("a/b", "two", 1);
        assert_eq!(
            index.len(),
            2,
            "a second SUBSCRIBE to a filter replaces the first"
        );
        index.remove("a/b/c", "one");
        index.remove("a/b/c", "one");
        index.remove("x/y", "one");
        assert_eq!(index.len(), 1);
        index.remove("a/b", "two");
        assert_eq!(index.len(), 0);
        assert!(index.root.is_empty(), "no empty level is left behind");
    }

    /// The trie agrees with matching every filter one by one, for every
    /// pair of a set of filters and topics with empty levels, `$` and
    /// wildcards in every place.
    #[test]
    fn the_trie_agrees_with_matching_filters_one_by_one() {
        let levels = ["a", "b", "", "$x"];
        let mut topics = vec![];
        for n in 1..=3 {
            let mut stack: Vec<Vec<&str>> = vec![vec![]];
            for _ in 0..n {
                stack = stack
                    .into_iter()
                    .flat_map(|t| {
                        levels.iter().map(move |l| {
                            let mut t = t.clone();
                            t.push(l);
                            t
                        })
                    })
                    .collect();
            }
            topics.extend(stack.into_iter().map(|t| t.join("/")));
        }
        let mut filters: Vec<String> = topics.clone();
        for t in &topics {
            let parts: Vec<&str> = t.split('/').collect();
            for i in 0..parts.len() {
                let mut plus = parts.clone();
                plus[i] = "+";
                filters.push(plus.join("/"));
                let mut hash = parts[..i].to_vec();
                hash.push("#");
                filters.push(hash.join("/"));
            }
        }
        filters.retain(|f| topic::valid_filter(f));
        filters.sort();
        filters.dedup();
        let mut index = Index::default();
        for (i, f) in filters.iter().enumerate() {
            index.insert(f, &format!("c{i}"), 1);
        }
        for t in topics.iter().filter(|t| topic::valid_name(t)) {
            let expected: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| topic::matches(f, t))
                .map(|(i, _)| format!("c{i}"))
                .collect();
            let mut got: Vec<String> = matching(&index, t).into_iter().map(|(c, _)| c).collect();
            let mut expected = expected;
            expected.sort();
            got.sort();
            assert_eq!(got, expected, "topic {t:?}");
        }
    }
}
