//! The upstream side: the connection to the cloud broker, the forwarder
//! that drains the store into it, and the sync of what the cloud sends back.

pub mod connection;
pub mod forwarder;
pub mod sync;

pub use connection::{tls_config, EdgeSas, Login, UpstreamError};
pub use forwarder::{CloudMessage, Forwarder};
