//! The upstream side: the link to the cloud broker and its consumers.
//!
//! - `link.rs`: the actor that owns the connection (addresses, failover,
//!   keepalive, subscriptions); everything else talks to it through a handle.
//! - `state.rs`: the MQTT session as a pure state machine (packet ids,
//!   acknowledgements), driven by the link.
//! - `connection.rs`: transport and handshake of one connection.
//! - `forwarder.rs`: drains the store through the link, in order, and
//!   dead-letters what the upstream refuses.
//! - `sync.rs`: the cloud's scope and hub twin documents, applied here.

pub mod connection;
pub mod forwarder;
pub mod link;
pub mod state;
pub mod sync;

pub use connection::{tls_config, EdgeSas, Login, Transport, UpstreamError};
pub use forwarder::Forwarder;
pub use link::{CloudMessage, Link, LinkConfig, LinkEvent, LinkHandle};
