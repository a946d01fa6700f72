//! The upstream side: the link to the cloud broker and its consumers.
//!
//! - `link.rs`: the actor that owns the connection (addresses, failover,
//!   keepalive, subscriptions); everything else talks to it through a handle.
//! - `state.rs`: the MQTT session as a pure state machine (packet ids,
//!   acknowledgements), driven by the link; `reliable.rs`: the link's own
//!   QoS 1 publishes (method answers, twin documents), kept until
//!   acknowledged.
//! - `connection.rs`: MQTT handshake and packet framing of one connection;
//!   `wire.rs`: the packets' bytes, MQTT 3.1.1 or 5; `error.rs`: what can
//!   go wrong, for every layer.
//! - `transport.rs`: the byte stream under it (TCP, TLS), with `proxy.rs`
//!   (HTTP CONNECT tunnels) and `websocket.rs` (MQTT over WebSocket).
//! - `forwarder.rs`: drains the store through the link, lane by lane and
//!   in order, and dead-letters what the upstream refuses; `window.rs`:
//!   what is in flight and what may leave the store; `ack_rate.rs`: how
//!   much may be in flight, from the upstream's acknowledgement rate;
//!   `pace.rs`: the drain's bytes-per-second cap.
//! - `sync.rs`: the cloud's scope and hub twin documents, applied here.
//! - `scoped.rs`: a consumer whose filters follow the device scope (one
//!   subscription per identity), for the three below.
//! - `methods.rs`: direct method calls from the cloud, answered back.
//! - `c2d.rs`: cloud-to-device messages for the scope's devices.
//! - `twins.rs`: device and module twins: desired documents in (one
//!   subscription per identity of the scope), reported documents out.

pub mod ack_rate;
pub mod c2d;
pub mod connection;
pub mod error;
pub mod forwarder;
pub mod link;
pub mod methods;
pub mod pace;
pub mod proxy;
pub mod reliable;
pub mod scoped;
pub mod state;
pub mod sync;
pub mod transport;
pub mod twins;
pub mod websocket;
pub mod window;
pub mod wire;

pub use connection::{EdgeSas, Login};
pub use error::UpstreamError;
pub use forwarder::Forwarder;
pub use link::{CloudMessage, Link, LinkConfig, LinkEvent, LinkHandle};
pub use proxy::Proxy;
pub use reliable::{Delivered, Reliable};
pub use transport::{tls_config, Transport};

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
