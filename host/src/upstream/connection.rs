//! One connection to an upstream broker: the CONNECT/CONNACK handshake and
//! packet framing over a transport, in MQTT 3.1.1 or 5, using rumqttc's
//! packet codecs. Packets read are mapped to one version-neutral
//! [`Incoming`]; packets written go through [`Wire`].
//!
//! Owns the framing of an open byte stream. It does not open that stream
//! (`transport.rs` does), decide what to send (the protocol state does) or
//! retry (the link actor does).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{Connect, Io};
use crate::config::{MqttVersion, UpstreamAddr};

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
    #[error("upstream refused CONNECT: {0}")]
    Refused(String),
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
            wire: Wire(login.version),
        };
        let credentials = login.credentials(crate::store::now_ms() / 1000);
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
            Incoming::ConnAck { refused: None } => Ok(conn),
            Incoming::ConnAck { refused: Some(why) } => Err(UpstreamError::Refused(why)),
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
        self.wire.read(&mut self.read_buf)
    }
}

/// What the link reads from the cloud, whichever the MQTT version.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// `refused`: why the broker refused the connection.
    ConnAck {
        refused: Option<String>,
    },
    /// `reason` is the v5 reason code (0 in 3.1.1); 0x80 and above: refused.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    /// For each filter of the SUBSCRIBE, whether it was refused.
    SubAck {
        pkid: u16,
        refused: Vec<bool>,
    },
    PingResp,
    /// The broker is closing the connection (v5 says why).
    Disconnect {
        reason: u8,
    },
    /// Anything the link does not act on.
    Other,
}

/// The encoding of one connection's packets: MQTT 3.1.1 or 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire(pub MqttVersion);

impl Wire {
    pub fn read(self, buf: &mut BytesMut) -> Result<Option<Incoming>, UpstreamError> {
        match self.0 {
            MqttVersion::V311 => match v4::Packet::read(buf, MAX_INCOMING) {
                Ok(p) => Ok(Some(from_v4(p))),
                Err(m::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(UpstreamError::Protocol(format!("{e:?}"))),
            },
            MqttVersion::V5 => match v5::Packet::read(buf, Some(MAX_INCOMING as u32)) {
                Ok(p) => Ok(Some(from_v5(p))),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(UpstreamError::Protocol(format!("{e:?}"))),
            },
        }
    }

    /// Encodes whichever of the two forms this connection speaks.
    fn put(
        self,
        out: &mut BytesMut,
        v4: impl FnOnce() -> v4::Packet,
        v5: impl FnOnce() -> v5::Packet,
    ) {
        let written = match self.0 {
            MqttVersion::V311 => v4().write(out, usize::MAX).map_err(|e| format!("{e:?}")),
            MqttVersion::V5 => v5().write(out, None).map_err(|e| format!("{e:?}")),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "could not encode an upstream packet");
        }
    }

    /// Acknowledges the cloud's QoS 1 publish `pkid`.
    pub fn puback(self, pkid: u16, out: &mut BytesMut) {
        self.put(
            out,
            || v4::Packet::PubAck(v4::PubAck::new(pkid)),
            || v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
        );
    }

    pub fn pingreq(self, out: &mut BytesMut) {
        self.put(
            out,
            || v4::Packet::PingReq,
            || v5::Packet::PingReq(v5::PingReq),
        );
    }

    pub fn disconnect(self, out: &mut BytesMut) {
        self.put(
            out,
            || v4::Packet::Disconnect,
            || {
                v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::NormalDisconnection,
                    properties: None,
                })
            },
        );
    }

    /// Subscribes to `filters` at QoS 1 under `pkid`.
    pub fn subscribe(self, pkid: u16, filters: &[String], out: &mut BytesMut) {
        self.put(
            out,
            || {
                let qos = m::QoS::AtLeastOnce;
                let filters = filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), qos));
                let mut s = v4::Subscribe::new_many(filters);
                s.pkid = pkid;
                v4::Packet::Subscribe(s)
            },
            || {
                let qos = m5::QoS::AtLeastOnce;
                let filters = filters.iter().map(|f| v5::Filter::new(f.clone(), qos));
                let mut s = v5::Subscribe::new_many(filters, None);
                s.pkid = pkid;
                v5::Packet::Subscribe(s)
            },
        );
    }

    /// A PUBLISH straight from borrowed bytes (the forwarder's hot path: no
    /// topic or payload copies). `pkid` 0 means QoS 0.
    pub fn publish(self, out: &mut BytesMut, topic: &str, payload: &[u8], pkid: u16, retain: bool) {
        use bytes::BufMut;
        let qos1 = pkid != 0;
        // v5: an empty property list, one byte.
        let properties = usize::from(self.0 == MqttVersion::V5);
        let mut remaining = 2 + topic.len() + if qos1 { 2 } else { 0 } + properties + payload.len();
        out.reserve(5 + remaining);
        out.put_u8(0x30 | if qos1 { 0x02 } else { 0 } | u8::from(retain));
        loop {
            let mut byte = (remaining % 128) as u8;
            remaining /= 128;
            if remaining > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if remaining == 0 {
                break;
            }
        }
        out.put_u16(topic.len() as u16);
        out.put_slice(topic.as_bytes());
        if qos1 {
            out.put_u16(pkid);
        }
        if properties == 1 {
            out.put_u8(0);
        }
        out.put_slice(payload);
    }
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(a) => Incoming::ConnAck {
            refused: (a.code != v4::ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
        },
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v4::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            refused: a
                .return_codes
                .iter()
                .map(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                .collect(),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect { reason: 0 },
        _ => Incoming::Other,
    }
}

/// The wire value of a v5 PUBACK reason.
fn puback_code(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(a) => Incoming::ConnAck {
            refused: (a.code != v5::ConnectReturnCode::Success).then(|| {
                let why = a.properties.and_then(|p| p.reason_string);
                format!(
                    "{:?}{}",
                    a.code,
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                )
            }),
        },
        v5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            reason: puback_code(a.reason),
        },
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v5::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            refused: a
                .return_codes
                .iter()
                .map(|c| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .collect(),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            reason: d.reason_code as u8,
        },
        _ => Incoming::Other,
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
            version: MqttVersion::V311,
        };
        let (user, password) = login.credentials(1_000).unwrap();
        assert_eq!(user, "hub.example/edge1/?api-version=2021-04-12");
        let token = crate::auth::sas::parse_token(&password).unwrap();
        assert_eq!(token.resource, "hub.example/devices/edge1");
        assert_eq!(token.expiry, 4_600);
        assert!(crate::auth::sas::verify(&token, b"edge-key"));
    }
}
