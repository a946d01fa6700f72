//! Rust bindings of the WIT worlds in `wit/plugin.wit`, one `bindgen!` per
//! world; the others reuse the `filter` world's types and host interface so
//! one linker serves all four.

pub mod filter {
    wasmtime::component::bindgen!({ path: "../wit", world: "filter" });
}

pub mod batch_filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "batch-filter",
        with: {
            "edgehub:plugin/types": super::filter::edgehub::plugin::types,
            "edgehub:plugin/host": super::filter::edgehub::plugin::host,
        },
    });
}

pub mod view_filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "view-filter",
        imports: { default: trappable },
        with: {
            "edgehub:plugin/types": super::filter::edgehub::plugin::types,
            "edgehub:plugin/host": super::filter::edgehub::plugin::host,
        },
    });
}

pub mod router {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
        with: {
            "edgehub:plugin/types": super::filter::edgehub::plugin::types,
            "edgehub:plugin/host": super::filter::edgehub::plugin::host,
        },
    });
}

pub use filter::edgehub::plugin::host as host_api;
pub use filter::edgehub::plugin::types::{Endpoint, Message};
pub use view_filter::edgehub::plugin::view::{self as view_api, Verdict as ViewVerdict};
