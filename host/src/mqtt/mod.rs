//! The downstream MQTT server: what local modules and devices connect to.
//!
//! Layout: `codec` (wire format, v3.1.1 and v5), `topic` (names, filters,
//! matching), `dialect` (IoT Hub topic forms), `listener` (accept loop), `packet_id` (the
//! packet id allocator, shared with the upstream link),
//! `session` (one connection), `broker` (local pub/sub state), `tls` (server
//! certificates).

pub mod broker;
pub mod codec;
pub mod dialect;
pub mod listener;
pub mod packet_id;
pub mod session;
pub mod tls;
pub mod topic;
