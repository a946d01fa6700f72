//! edgehub: an offline-first edge hub for IoT gateways.
//!
//! Data flows one way: `mqtt` (listener, sessions) -> `routing` -> `store`
//! (durable queue) -> `upstream` (forwarder to the cloud broker), and
//! `routing` -> `broker` (local publish/subscribe), carrying one type,
//! `message::Message` (its body shared, never copied, on the way; converted
//! to the plugins' WIT record only inside `plugins`). `auth` decides who sessions
//! are and what they may do, from the device scope that `upstream::sync`
//! receives; `twins` answers identities' twin requests (the session hands
//! it each `$iothub` request, see `iothub`) and `methods` carries direct
//! method calls to them (from the cloud, or from modules through `api`), `c2d` the cloud's messages to devices. `hub` wires them together and owns start-up and shutdown;
//! `config` and `metrics` serve them all; `control` is the operator's
//! socket into a running hub's store (dead letters); `doorbell` (results
//! from a plain thread to the runtime through its I/O driver), `durable_file`
//! (crash-safe file replacement), `iothub` (each connection's own
//! `$iothub/...` topics), `pem` (certificates and keys), `websocket` (MQTT over WebSocket, both
//! sides), `topic`
//! (MQTT topic names and filters) and `packet_id` (MQTT packet ids) are
//! shared helpers.

pub mod api;
pub mod auth;
pub mod broker;
pub mod c2d;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod control;
pub mod doorbell;
pub mod durable_file;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod inputs;
pub mod iothub;
pub mod mailbox;
pub mod message;
pub mod methods;
pub mod metrics;
pub mod monitor;
pub mod mqtt;
pub mod packet_id;
pub mod pem;
pub mod plugins;
pub mod protocol;
pub mod routing;
pub mod store;
pub mod topic;
pub mod twin;
pub mod twins;
pub mod upstream;
pub mod websocket;
