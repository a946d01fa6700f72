//! passthrough: a filter that returns every message unchanged. It does no
//! work of its own, so a route through it measures what the plugin path
//! itself costs: copying the messages into the guest and back, the call, and
//! the host's bookkeeping around it (the `edgehub-passthrough` bench system).
//! It exports the batch entry point, so the host hands it the messages
//! waiting for it in one call.

wit_bindgen::generate!({ path: "../../../wit", world: "batch-filter" });

struct Plugin;

impl Guest for Plugin {
    fn filter(m: Message) -> Option<Message> {
        Some(m)
    }

    fn filter_batch(ms: Vec<Message>) -> Vec<Option<Message>> {
        ms.into_iter().map(Some).collect()
    }
}

export!(Plugin);
