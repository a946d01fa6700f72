//! dedup: drops a message that was already seen. A message is known by its
//! `$messageId` system property (`"by": "messageId"`, the default; messages
//! without one pass) or by its source and body (`"by": "body"`). The last
//! `capacity` keys (default 10000) are remembered, in the instance's memory:
//! the hub runs each plugin on one worker, so every message of this plugin
//! meets the same memory until the instance is replaced (a reload, a failure).
//! It exports the `batch-filter` world: the hub hands it the messages waiting
//! for it in one call, in order.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use edgehub::plugin::host;

wit_bindgen::generate!({ path: "../../../wit", world: "batch-filter" });

struct Seen {
    by_body: bool,
    capacity: usize,
    order: VecDeque<u64>,
    keys: HashSet<u64>,
}

thread_local! {
    static SEEN: RefCell<Option<Seen>> = const { RefCell::new(None) };
}

fn key(m: &Message, by_body: bool) -> Option<u64> {
    let mut h = DefaultHasher::new();
    if by_body {
        m.source.hash(&mut h);
        m.body.hash(&mut h);
    } else {
        let id = m
            .system_properties
            .iter()
            .find(|(k, _)| k == "$messageId")
            .map(|(_, v)| v)?;
        id.hash(&mut h);
    }
    Some(h.finish())
}

struct Plugin;

impl Guest for Plugin {
    fn filter_batch(ms: Vec<Message>) -> Vec<Option<Message>> {
        ms.into_iter().map(Self::filter).collect()
    }

    fn filter(m: Message) -> Option<Message> {
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            let seen = seen.get_or_insert_with(|| {
                let v: serde_json::Value =
                    serde_json::from_str(&host::config()).unwrap_or_default();
                Seen {
                    by_body: v["by"].as_str() == Some("body"),
                    capacity: v["capacity"].as_u64().unwrap_or(10_000).max(1) as usize,
                    order: VecDeque::new(),
                    keys: HashSet::new(),
                }
            });
            let Some(k) = key(&m, seen.by_body) else {
                return Some(m);
            };
            if !seen.keys.insert(k) {
                return None;
            }
            seen.order.push_back(k);
            if seen.order.len() > seen.capacity {
                if let Some(old) = seen.order.pop_front() {
                    seen.keys.remove(&old);
                }
            }
            Some(m)
        })
    }
}

export!(Plugin);
