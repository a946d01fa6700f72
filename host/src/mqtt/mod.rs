//! The downstream MQTT server: what local modules and devices connect to.
//!
//! Layout: `codec` (wire format, v3.1.1 and v5), `listener` (accept loop),
//! `session` (one connection: it turns each publish into the hub's
//! `message::Message` and hands it to the router), `liveness` (one task
//! watching every connection's keepalive, and telling them of a shutdown
//! or a new scope), `tls` (server certificates). Topic names and filters are in the top-level
//! `topic` module, packet ids in `packet_id`: both are MQTT's, but `auth`,
//! `routing` and `upstream` use them too. The local broker the sessions
//! attach to is the top-level `broker`: a destination of routed messages,
//! not the way in.

pub mod codec;
pub mod listener;
pub mod liveness;
pub mod session;
pub mod tls;
