//! The upstream side: the connection to the cloud broker and the forwarder
//! that drains the store into it.

pub mod connection;
pub mod forwarder;

pub use connection::{tls_config, Login, UpstreamError};
pub use forwarder::Forwarder;
