//! One connection to an upstream broker: the CONNECT/CONNACK handshake and
//! packet framing over a transport, in MQTT 3.1.1 or 5 (the bytes of each
//! packet are `wire.rs`'s).
//!
//! Owns the framing of an open byte stream. It does not open that stream
//! (`transport.rs` does), decide what to send (the protocol state does) or
//! retry (the link actor does).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::UpstreamError;
use super::transport::{Connect, Io};
use super::wire::{Incoming, Limits, Wire};
use crate::config::{MqttVersion, UpstreamAddr};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The smallest Maximum Packet Size an upstream may announce and be used.
/// Below it the broker is misconfigured (or hostile): taking it at its word
/// would move nearly every queued message to the dead-letter area, so the
/// hub does not send to it and keeps the queue.
pub const MIN_PACKET_SIZE: u32 = 1024;

/// Refuses an upstream whose announced limits would condemn the queue.
fn check_limits(limits: &Limits) -> Result<(), UpstreamError> {
    match limits.max_packet_size {
        Some(n) if n < MIN_PACKET_SIZE => Err(UpstreamError::Unusable(format!(
            "it announces a Maximum Packet Size of {n} bytes, below the {MIN_PACKET_SIZE} the hub needs; the queue is kept until the broker takes larger packets"
        ))),
        _ => Ok(()),
    }
}

/// How to log in upstream.
#[derive(Clone)]
pub struct Login {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The edge device's own IoT Hub identity: a fresh SAS token is made
    /// for each connection (overrides `username`/`password`).
    pub sas: Option<EdgeSas>,
    pub keep_alive: u16,
    /// MQTT clean session. Off by default: the cloud keeps the hub's
    /// subscriptions and its unacknowledged QoS 1 messages across a
    /// reconnect, so nothing it sent while the link was down is lost.
    pub clean_session: bool,
    /// MQTT 3.1.1 or 5 (which says why a publish is refused).
    pub version: MqttVersion,
}

/// How the hub signs in as its own device on an IoT Hub style upstream.
#[derive(Clone)]
pub struct EdgeSas {
    pub hub_name: String,
    pub key: Vec<u8>,
    /// Lifetime of each token.
    pub ttl_secs: u64,
}

impl Login {
    /// Username and password for the next CONNECT.
    pub fn credentials(&self, now_secs: u64) -> Option<(String, String)> {
        match &self.sas {
            Some(sas) => {
                let resource = format!("{}/devices/{}", sas.hub_name, self.client_id);
                let token =
                    crate::auth::sas::make_token(&sas.key, &resource, now_secs + sas.ttl_secs);
                let user = format!(
                    "{}/{}/?api-version=2021-04-12",
                    sas.hub_name, self.client_id
                );
                Some((user, token))
            }
            None => self
                .username
                .clone()
                .map(|u| (u, self.password.clone().unwrap_or_default())),
        }
    }
}

/// One established MQTT connection: the socket and its framing.
pub struct Connection {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    /// What is queued to be sent by [`Connection::flush`].
    pub write_buf: BytesMut,
    wire: Wire,
    /// What the broker's CONNACK asks the hub to keep to.
    pub limits: Limits,
}

impl Connection {
    /// Connects to `addr` and logs in (CONNECT, then CONNACK), within the
    /// handshake timeout.
    pub async fn open(
        connector: &dyn Connect,
        addr: &UpstreamAddr,
        login: &Login,
    ) -> Result<Self, UpstreamError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let io = connector.connect(addr).await?;
            Self::handshake(io, login).await
        })
        .await
        .map_err(|_| UpstreamError::Timeout)?
    }

    async fn handshake(io: Box<dyn Io>, login: &Login) -> Result<Self, UpstreamError> {
        let mut conn = Connection {
            io,
            read_buf: BytesMut::with_capacity(BUF_BYTES),
            write_buf: BytesMut::with_capacity(BUF_BYTES),
            wire: Wire(login.version),
            limits: Limits::default(),
        };
        let credentials = login.credentials(crate::clock::wall_ms() / 1000);
        let encoded = match login.version {
            MqttVersion::V311 => {
                let mut connect = v4::Connect::new(login.client_id.clone());
                connect.keep_alive = login.keep_alive;
                connect.clean_session = login.clean_session;
                if let Some((user, password)) = credentials {
                    connect.set_login(user, password);
                }
                v4::Packet::Connect(connect)
                    .write(&mut conn.write_buf, usize::MAX)
                    .map_err(|e| format!("{e:?}"))
            }
            MqttVersion::V5 => {
                let properties = (!login.clean_session).then(|| v5::ConnectProperties {
                    // A persistent session that outlives any outage.
                    session_expiry_interval: Some(u32::MAX),
                    ..v5::ConnectProperties::new()
                });
                let connect = v5::Connect {
                    keep_alive: login.keep_alive,
                    client_id: login.client_id.clone(),
                    clean_start: login.clean_session,
                    properties,
                };
                let login = credentials.map(|(u, p)| v5::Login::new(u, p));
                v5::Packet::Connect(connect, None, login)
                    .write(&mut conn.write_buf, None)
                    .map_err(|e| format!("{e:?}"))
            }
        };
        if let Err(e) = encoded {
            return Err(UpstreamError::Protocol(format!(
                "cannot encode CONNECT: {e}"
            )));
        }
        conn.flush().await?;
        match conn.next().await? {
            Incoming::ConnAck {
                refused: None,
                limits,
            } => {
                // A Receive Maximum of 0 is a protocol error (MQTT 5
                // 3.2.2.3.3): take it as no limit announced.
                conn.limits = Limits {
                    receive_max: limits.receive_max.filter(|&n| n > 0),
                    ..limits
                };
                check_limits(&conn.limits)?;
                Ok(conn)
            }
            Incoming::ConnAck {
                refused: Some(why), ..
            } => Err(UpstreamError::Refused(why)),
            other => Err(UpstreamError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    pub fn wire(&self) -> Wire {
        self.wire
    }

    pub async fn flush(&mut self) -> Result<(), UpstreamError> {
        if !self.write_buf.is_empty() {
            self.io.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            give_back(&mut self.write_buf);
            // Framed transports (WebSocket) send on flush.
            self.io.flush().await?;
        }
        Ok(())
    }

    /// Next packet from upstream. Cancel-safe: bytes read stay buffered.
    pub async fn next(&mut self) -> Result<Incoming, UpstreamError> {
        loop {
            if let Some(p) = self.try_next()? {
                return Ok(p);
            }
            if self.io.read_buf(&mut self.read_buf).await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }

    /// A packet already buffered, if any.
    pub fn try_next(&mut self) -> Result<Option<Incoming>, UpstreamError> {
        let packet = self.wire.read(&mut self.read_buf)?;
        give_back(&mut self.read_buf);
        Ok(packet)
    }
}

/// Size of a connection's buffers, and what they may grow to and keep.
const BUF_BYTES: usize = 64 * 1024;
const BUF_KEEP_BYTES: usize = 1 << 20;

/// Replaces an empty buffer that grew past [`BUF_KEEP_BYTES`] (the first
/// fill of a far cloud's window writes megabytes at once) with a fresh one,
/// so a drained hub gives that memory back.
fn give_back(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > BUF_KEEP_BYTES {
        *buf = BytesMut::with_capacity(BUF_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_buffer_that_grew_past_a_mebibyte_is_given_back_and_a_small_one_kept() {
        let mut big = BytesMut::with_capacity(4 << 20);
        big.extend_from_slice(b"x");
        give_back(&mut big);
        assert!(big.capacity() >= 4 << 20, "not empty: kept");
        big.clear();
        give_back(&mut big);
        assert_eq!(big.capacity(), BUF_BYTES);
        let mut small = BytesMut::with_capacity(BUF_BYTES * 2);
        give_back(&mut small);
        assert_eq!(small.capacity(), BUF_BYTES * 2);
    }

    #[test]
    fn the_edge_signs_in_with_a_fresh_sas_token_for_its_own_identity() {
        let login = Login {
            client_id: "edge1".into(),
            username: Some("ignored".into()),
            password: None,
            sas: Some(EdgeSas {
                hub_name: "hub.example".into(),
                key: b"edge-key".to_vec(),
                ttl_secs: 3600,
            }),
            keep_alive: 30,
            clean_session: false,
            version: MqttVersion::V311,
        };
        let (user, password) = login.credentials(1_000).unwrap();
        assert_eq!(user, "hub.example/edge1/?api-version=2021-04-12");
        let token = crate::auth::sas::parse_token(&password).unwrap();
        assert_eq!(token.resource, "hub.example/devices/edge1");
        assert_eq!(token.expiry, 4_600);
        assert!(crate::auth::sas::verify(&token, b"edge-key"));
    }

    #[test]
    fn an_upstream_announcing_a_tiny_maximum_packet_size_is_not_used() {
        let limits = |n| Limits {
            receive_max: None,
            max_packet_size: n,
        };
        assert!(check_limits(&limits(None)).is_ok(), "3.1.1: none announced");
        assert!(check_limits(&limits(Some(MIN_PACKET_SIZE))).is_ok());
        let err = check_limits(&limits(Some(20))).unwrap_err().to_string();
        assert!(err.contains("Maximum Packet Size of 20 bytes"), "{err}");
    }
}
