//! One connection to an upstream broker: the MQTT 3.1.1 CONNECT/CONNACK
//! handshake and packet framing over a transport, using rumqttc's packet
//! codec.
//!
//! Owns the framing of an open byte stream. It does not open that stream
//! (`transport.rs` does), decide what to send (the protocol state does) or
//! retry (the link actor does).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::{self as m, v4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{Connect, Io};
use crate::config::UpstreamAddr;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_INCOMING: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("proxy {proxy} refused CONNECT to {target}: HTTP {status} {reason}{}", refusal_hint(*status))]
    ProxyRefused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("proxy {proxy} answered CONNECT to {target} with {problem}")]
    ProxyProtocol {
        proxy: String,
        target: String,
        problem: String,
    },
    #[error("WebSocket handshake with {addr}: {message}")]
    WebSocket { addr: String, message: String },
    #[error("upstream refused CONNECT: {0:?}")]
    Refused(v4::ConnectReturnCode),
    #[error("upstream handshake timed out")]
    Timeout,
    #[error("upstream closed the connection")]
    Closed,
    #[error("upstream sent a bad packet: {0}")]
    Protocol(String),
    #[error(transparent)]
    State(#[from] super::state::StateError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a proxy's refusal usually means, for the log line.
fn refusal_hint(status: u16) -> &'static str {
    match status {
        401 | 407 => " (check the user and password of upstream.proxy / https_proxy)",
        403 => " (the proxy does not allow tunnels to this host or port)",
        _ => "",
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
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(64 * 1024),
        };
        let mut connect = v4::Connect::new(login.client_id.clone());
        connect.keep_alive = login.keep_alive;
        connect.clean_session = login.clean_session;
        if let Some((user, password)) = login.credentials(crate::store::now_ms() / 1000) {
            connect.set_login(user, password);
        }
        if let Err(e) = v4::Packet::Connect(connect).write(&mut conn.write_buf, usize::MAX) {
            return Err(UpstreamError::Protocol(format!(
                "cannot encode CONNECT: {e:?}"
            )));
        }
        conn.flush().await?;
        match conn.next().await? {
            v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => Ok(conn),
            v4::Packet::ConnAck(ack) => Err(UpstreamError::Refused(ack.code)),
            other => Err(UpstreamError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    pub async fn flush(&mut self) -> Result<(), UpstreamError> {
        if !self.write_buf.is_empty() {
            self.io.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            // Framed transports (WebSocket) send on flush.
            self.io.flush().await?;
        }
        Ok(())
    }

    /// Next packet from upstream. Cancel-safe: bytes read stay buffered.
    pub async fn next(&mut self) -> Result<v4::Packet, UpstreamError> {
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
    pub fn try_next(&mut self) -> Result<Option<v4::Packet>, UpstreamError> {
        match v4::Packet::read(&mut self.read_buf, MAX_INCOMING) {
            Ok(p) => Ok(Some(p)),
            Err(m::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(UpstreamError::Protocol(format!("{e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let (user, password) = login.credentials(1_000).unwrap();
        assert_eq!(user, "hub.example/edge1/?api-version=2021-04-12");
        let token = crate::auth::sas::parse_token(&password).unwrap();
        assert_eq!(token.resource, "hub.example/devices/edge1");
        assert_eq!(token.expiry, 4_600);
        assert!(crate::auth::sas::verify(&token, b"edge-key"));
    }
}
