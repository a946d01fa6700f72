//! passthrough: a filter that keeps every message unchanged. It does no
//! work of its own, so a route through it measures what the plugin path
//! itself costs: the hand-off to the plugin's worker, the call, and the
//! host's bookkeeping around it (the `edgehub-passthrough` bench system).
//! It exports the `view-filter` world: the host lends it every message
//! waiting for it in one call, and since it reads nothing and keeps
//! everything, nothing of a message is copied into it or back.

wit_bindgen::generate!({ path: "../../../wit", world: "view-filter" });

struct Plugin;

impl Guest for Plugin {
    fn filter_views(count: u32) -> Vec<Verdict> {
        (0..count).map(|_| Verdict::Keep).collect()
    }
}

export!(Plugin);
