//! MQTT 3.1.1 and 5 on the wire, mapped to one set of packet types.
//!
//! Owns framing and translation only: parsing is rumqttc's codec
//! (`mqttbytes::v4` and `v5::mqttbytes::v5`); this module picks the version
//! from the CONNECT and turns both dialects into [`Inbound`] / [`Outbound`],
//! so sessions are written once. It keeps no session state.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("packet of {size} bytes is larger than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet not allowed from a client: {0}")]
    Unexpected(&'static str),
}

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone)]
pub struct Connect {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 session expiry; 3.1.1 persistent sessions never expire.
    pub session_expiry: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
}

#[derive(Debug)]
pub enum Inbound {
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// A normal end; `with_will`: MQTT 5 reason 0x04, the will goes out
    /// all the same.
    Disconnect {
        with_will: bool,
    },
}

/// Why a CONNECT is refused; mapped to each version's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    Success,
    UnsupportedProtocol,
    BadClientId,
    ServerUnavailable,
    /// At the connection limit (5: quota exceeded; 3.1.1: server unavailable).
    Busy,
    BadCredentials,
    NotAuthorized,
}

/// Outcome of a QoS 1/2 publish, as the v5 reason code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubReason {
    Success,
    NotAuthorized,
    QuotaExceeded,
    TopicNameInvalid,
    UnspecifiedError,
}

/// Why a subscription filter is refused (v5 says which; 3.1.1 says 0x80).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubRefusal {
    InvalidFilter,
    NotAuthorized,
}

/// Reason for a server-sent DISCONNECT (v5 only; 3.1.1 just closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    MalformedPacket,
    ProtocolError,
    NotAuthorized,
    PacketTooLarge,
    QuotaExceeded,
    KeepAliveTimeout,
    SessionTakenOver,
    ServerShuttingDown,
}

#[derive(Debug)]
pub enum Outbound {
    ConnAck {
        code: ConnAckCode,
        session_present: bool,
        assigned_client_id: Option<String>,
    },
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: PubReason,
    },
    PubRec {
        pkid: u16,
        reason: PubReason,
    },
    PubRel(u16),
    PubComp(u16),
    /// Granted QoS per filter, `None` for a refused filter.
    SubAck {
        pkid: u16,
        /// Granted QoS per filter, or why it was refused.
        granted: Vec<Result<u8, SubRefusal>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Disconnect(DisconnectReason),
}

/// Reads the CONNECT that must open a connection. `Ok(None)`: more bytes needed.
pub fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Option<Connect>, CodecError> {
    // Refuse on the first byte rather than waiting for a whole bogus packet.
    if buf.first().is_some_and(|b| b >> 4 != 1) {
        return Err(CodecError::NotConnect);
    }
    let header = match m::check(buf.iter(), max) {
        Ok(h) => h,
        Err(m::Error::InsufficientBytes(_)) => return Ok(None),
        Err(m::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(CodecError::TooLarge { size, max })
        }
        Err(e) => return Err(CodecError::Malformed(format!("{e:?}"))),
    };
    // Variable header: protocol name (u16-prefixed) then the level byte.
    // Fixed header: the type byte, then 1..4 bytes of remaining length.
    let fixed_len = 1
        + buf[1..]
            .iter()
            .take(4)
            .position(|b| b & 0x80 == 0)
            .unwrap_or(3)
        + 1;
    let mut vh = &buf[fixed_len..header.frame_length()];
    if vh.len() < 3 {
        return Err(CodecError::Malformed("CONNECT too short".into()));
    }
    let name_len = vh.get_u16() as usize;
    if vh.len() < name_len + 1 {
        return Err(CodecError::Malformed("CONNECT too short".into()));
    }
    let name = String::from_utf8_lossy(&vh[..name_len]).into_owned();
    let level = vh[name_len];
    if name != "MQTT" || !(level == 4 || level == 5) {
        buf.advance(header.frame_length());
        return Err(CodecError::UnsupportedProtocol { name, level });
    }
    if level == 4 {
        match v4::Packet::read(buf, max).map_err(malformed)? {
            v4::Packet::Connect(c) => Ok(Some(Connect {
                protocol: Protocol::V4,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                }),
                username: c
                    .login
                    .as_ref()
                    .map(|l| l.username.clone())
                    .filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                session_expiry: None,
            })),
            _ => Err(CodecError::NotConnect),
        }
    } else {
        match v5::Packet::read(buf, Some(max as u32)).map_err(malformed5)? {
            v5::Packet::Connect(c, will, login) => {
                let will = match will {
                    Some(w) => Some(Will {
                        topic: String::from_utf8(w.topic.to_vec())
                            .map_err(|_| CodecError::Malformed("will topic is not UTF-8".into()))?,
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                    None => None,
                };
                Ok(Some(Connect {
                    protocol: Protocol::V5,
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    will,
                    username: login
                        .as_ref()
                        .map(|l| l.username.clone())
                        .filter(|u| !u.is_empty()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    session_expiry: c.properties.and_then(|p| p.session_expiry_interval),
                }))
            }
            _ => Err(CodecError::NotConnect),
        }
    }
}

fn malformed(e: m::Error) -> CodecError {
    match e {
        m::Error::PayloadSizeLimitExceeded(size) => CodecError::TooLarge { size, max: 0 },
        e => CodecError::Malformed(format!("{e:?}")),
    }
}

fn malformed5(e: m5::Error) -> CodecError {
    match e {
        m5::Error::PayloadSizeLimitExceeded { pkt_size, max } => CodecError::TooLarge {
            size: pkt_size,
            max: max as usize,
        },
        e => CodecError::Malformed(format!("{e:?}")),
    }
}

/// Reads and writes the packets after CONNECT, for one protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub protocol: Protocol,
    pub max_size: usize,
}

impl Codec {
    /// Next whole packet from `buf`, `Ok(None)` when more bytes are needed.
    pub fn read(&self, buf: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        if buf.is_empty() {
            return Ok(None);
        }
        match self.protocol {
            Protocol::V4 => match v4::Packet::read(buf, self.max_size) {
                Ok(p) => from_v4(p).map(Some),
                Err(m::Error::InsufficientBytes(_)) => Ok(None),
                Err(m::Error::PayloadSizeLimitExceeded(size)) => Err(CodecError::TooLarge {
                    size,
                    max: self.max_size,
                }),
                Err(e) => Err(malformed(e)),
            },
            // MQTT 5 3.14.2.1: a DISCONNECT may end after its fixed header
            // (reason 0x00) or its reason (no properties); the codec wants
            // more.
            Protocol::V5 if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] <= 1 => {
                let len = 2 + buf[1] as usize;
                if buf.len() < len {
                    return Ok(None);
                }
                let packet = buf.split_to(len);
                Ok(Some(Inbound::Disconnect {
                    with_will: packet.get(2) == Some(&0x04),
                }))
            }
            Protocol::V5 => match v5::Packet::read(buf, Some(self.max_size as u32)) {
                Ok(p) => from_v5(p).map(Some),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(malformed5(e)),
            },
        }
    }

    /// Appends the encoding of `packet` to `out`.
    pub fn write(&self, packet: Outbound, out: &mut BytesMut) {
        let result = match self.protocol {
            Protocol::V4 => match to_v4(packet) {
                Some(p) => p
                    .write(out, usize::MAX)
                    .map(|_| ())
                    .map_err(|e| format!("{e:?}")),
                None => Ok(()),
            },
            Protocol::V5 => to_v5(packet)
                .write(out, None)
                .map(|_| ())
                .map_err(|e| format!("{e:?}")),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not encode an outgoing packet");
        }
    }
}

fn qos_v4(q: u8) -> m::QoS {
    match q {
        0 => m::QoS::AtMostOnce,
        1 => m::QoS::AtLeastOnce,
        _ => m::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> m5::QoS {
    match q {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

fn from_v4(p: v4::Packet) -> Result<Inbound, CodecError> {
    Ok(match p {
        v4::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Inbound::PubRec(a.pkid),
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { with_will: false },
        v4::Packet::Connect(_) => return Err(CodecError::Unexpected("a second CONNECT")),
        _ => return Err(CodecError::Unexpected("a server-to-client packet")),
    })
}

fn from_v5(p: v5::Packet) -> Result<Inbound, CodecError> {
    Ok(match p {
        v5::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
        }),
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Inbound::PubRec(a.pkid),
        v5::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Connect(..) => return Err(CodecError::Unexpected("a second CONNECT")),
        v5::Packet::Auth(_) => {
            return Err(CodecError::Unexpected(
                "AUTH (enhanced auth is not supported)",
            ))
        }
        _ => return Err(CodecError::Unexpected("a server-to-client packet")),
    })
}

fn to_v4(p: Outbound) -> Option<v4::Packet> {
    Some(match p {
        Outbound::ConnAck {
            code,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                ConnAckCode::Success => v4::ConnectReturnCode::Success,
                ConnAckCode::UnsupportedProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                ConnAckCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnAckCode::ServerUnavailable | ConnAckCode::Busy => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                ConnAckCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                ConnAckCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
            session_present,
        )),
        Outbound::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_v4(p.qos),
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
        }),
        // 3.1.1 has no negative acknowledgements: the session closes instead.
        Outbound::PubAck {
            pkid,
            reason: PubReason::Success,
        } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outbound::PubRec {
            pkid,
            reason: PubReason::Success,
        } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Outbound::PubAck { .. } | Outbound::PubRec { .. } => return None,
        Outbound::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel::new(pkid)),
        Outbound::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|g| match g {
                    Ok(q) => v4::SubscribeReasonCode::Success(qos_v4(q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect(_) => return None,
    })
}

fn to_v5(p: Outbound) -> v5::Packet {
    match p {
        Outbound::ConnAck {
            code,
            session_present,
            assigned_client_id,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: match code {
                ConnAckCode::Success => v5::ConnectReturnCode::Success,
                ConnAckCode::UnsupportedProtocol => {
                    v5::ConnectReturnCode::UnsupportedProtocolVersion
                }
                ConnAckCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnAckCode::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                ConnAckCode::Busy => v5::ConnectReturnCode::QuotaExceeded,
                ConnAckCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                ConnAckCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: assigned_client_id.map(|id| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: None,
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: Some(id),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outbound::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_v5(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        Outbound::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match reason {
                PubReason::Success => v5::PubAckReason::Success,
                PubReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PubReason::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                PubReason::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
                PubReason::UnspecifiedError => v5::PubAckReason::UnspecifiedError,
            },
            properties: None,
        }),
        Outbound::PubRec { pkid, reason } => v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: match reason {
                PubReason::Success => v5::PubRecReason::Success,
                PubReason::NotAuthorized => v5::PubRecReason::NotAuthorized,
                PubReason::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                PubReason::TopicNameInvalid => v5::PubRecReason::TopicNameInvalid,
                PubReason::UnspecifiedError => v5::PubRecReason::UnspecifiedError,
            },
            properties: None,
        }),
        Outbound::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel {
            pkid,
            reason: v5::PubRelReason::Success,
            properties: None,
        }),
        Outbound::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp {
            pkid,
            reason: v5::PubCompReason::Success,
            properties: None,
        }),
        Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|g| match g {
                    Ok(q) => v5::SubscribeReasonCode::Success(qos_v5(q)),
                    Err(SubRefusal::InvalidFilter) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(SubRefusal::NotAuthorized) => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: match reason {
                DisconnectReason::MalformedPacket => v5::DisconnectReasonCode::MalformedPacket,
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::NotAuthorized => v5::DisconnectReasonCode::NotAuthorized,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                DisconnectReason::QuotaExceeded => v5::DisconnectReasonCode::QuotaExceeded,
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                DisconnectReason::ServerShuttingDown => {
                    v5::DisconnectReasonCode::ServerShuttingDown
                }
            },
            properties: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8) -> BytesMut {
        // CONNECT, clean session, keepalive 60, client id "c1"
        let mut b = BytesMut::new();
        let mut vh = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        if level == 5 {
            vh.push(0); // no properties
        }
        vh.extend_from_slice(&[0, 2, b'c', b'1']);
        b.extend_from_slice(&[0x10, vh.len() as u8]);
        b.extend_from_slice(&vh);
        b
    }

    #[test]
    fn both_versions_of_connect_are_read() {
        for (level, proto) in [(4, Protocol::V4), (5, Protocol::V5)] {
            let mut b = connect_bytes(level);
            let c = read_connect(&mut b, 1024).unwrap().unwrap();
            assert_eq!(
                (c.protocol, c.client_id.as_str(), c.keep_alive),
                (proto, "c1", 60)
            );
            assert!(b.is_empty());
        }
    }

    #[test]
    fn an_mqtt5_disconnect_of_length_zero_is_a_normal_end_and_reason_4_keeps_the_will() {
        let v5 = Codec {
            protocol: Protocol::V5,
            max_size: 1024,
        };
        let mut b = BytesMut::from(&[0xE0, 0x00, 0xC0, 0x00][..]);
        assert!(matches!(
            v5.read(&mut b),
            Ok(Some(Inbound::Disconnect { with_will: false }))
        ));
        assert!(matches!(v5.read(&mut b), Ok(Some(Inbound::PingReq))));
        let mut b = BytesMut::from(&[0xE0, 0x01, 0x04][..]);
        assert!(matches!(
            v5.read(&mut b),
            Ok(Some(Inbound::Disconnect { with_will: true }))
        ));
    }

    #[test]
    fn a_partial_connect_asks_for_more_bytes() {
        let mut b = connect_bytes(4);
        let mut half = b.split_to(5);
        assert!(read_connect(&mut half, 1024).unwrap().is_none());
    }

    #[test]
    fn an_unknown_protocol_level_is_refused() {
        let mut b = connect_bytes(9);
        assert!(matches!(
            read_connect(&mut b, 1024),
            Err(CodecError::UnsupportedProtocol { level: 9, .. })
        ));
    }

    #[test]
    fn a_first_packet_that_is_not_connect_is_refused() {
        let mut b = BytesMut::from(&[0x30u8, 3, 0, 1, b'a'][..]);
        assert!(matches!(
            read_connect(&mut b, 1024),
            Err(CodecError::NotConnect)
        ));
    }

    #[test]
    fn an_oversized_publish_is_refused_before_it_is_buffered() {
        let codec = Codec {
            protocol: Protocol::V4,
            max_size: 100,
        };
        // PUBLISH with a remaining length of 1000 but only the header present.
        let mut b = BytesMut::from(&[0x30u8, 0xE8, 0x07][..]);
        assert!(matches!(
            codec.read(&mut b),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
