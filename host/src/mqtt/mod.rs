//! The downstream MQTT server: what local modules and devices connect to.
//!
//! Layout: `codec` (wire format, v3.1.1 and v5), `dialect` (IoT Hub topic
//! forms), `listener` (accept loop), `session` (one connection), `tls`
//! (server certificates). Topic names and filters are in the top-level
//! `topic` module, packet ids in `packet_id`: both are MQTT's, but `auth`,
//! `routing` and `upstream` use them too. The local broker the sessions
//! attach to is the top-level `broker`: a destination of routed messages,
//! not the way in.

pub mod codec;
pub mod dialect;
pub mod listener;
pub mod session;
pub mod tls;
