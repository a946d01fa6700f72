//! The bytes of the upstream protocol: MQTT 3.1.1 or 5 packets read into
//! one version-neutral [`Incoming`], and written through [`Wire`], using
//! rumqttc's packet codecs. No state, no I/O.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

use crate::config::MqttVersion;

/// A packet from upstream that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent a bad packet: {0}")]
pub struct Malformed(pub String);

/// Largest packet read from upstream.
const MAX_INCOMING: usize = 16 * 1024 * 1024;

/// What the link reads from the cloud, whichever the MQTT version.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// `refused`: why the broker refused the connection.
    ConnAck {
        refused: Option<Refusal>,
        limits: Limits,
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
    UnsubAck {
        pkid: u16,
    },
    PingResp,
    /// The broker is closing the connection (v5 says why).
    Disconnect {
        reason: u8,
    },
    /// Anything the link does not act on.
    Other,
}

/// Why a broker refused a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    /// "Server unavailable" or "busy": the broker is there but not serving
    /// (a cluster node whose storage is not ready), not a refusal of who
    /// connects.
    pub unavailable: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// What an MQTT 5 broker's CONNACK tells the client to keep to; an MQTT
/// 3.1.1 broker says nothing (all `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Receive Maximum: QoS 1 publishes it takes unacknowledged at once.
    pub receive_max: Option<u16>,
    /// Maximum Packet Size, in bytes, of what it accepts.
    pub max_packet_size: Option<u32>,
}

/// The encoding of one connection's packets: MQTT 3.1.1 or 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire(pub MqttVersion);

impl Wire {
    pub fn read(self, buf: &mut BytesMut) -> Result<Option<Incoming>, Malformed> {
        match self.0 {
            MqttVersion::V311 => match v4::Packet::read(buf, MAX_INCOMING) {
                Ok(p) => Ok(Some(from_v4(p))),
                Err(m::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(Malformed(format!("{e:?}"))),
            },
            MqttVersion::V5 => match v5::Packet::read(buf, Some(MAX_INCOMING as u32)) {
                Ok(p) => checked_v5(&p).map(|()| Some(from_v5(p))),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(Malformed(format!("{e:?}"))),
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

    /// Unsubscribes from `filters` under `pkid`.
    pub fn unsubscribe(self, pkid: u16, filters: &[String], out: &mut BytesMut) {
        self.put(
            out,
            || {
                v4::Packet::Unsubscribe(v4::Unsubscribe {
                    pkid,
                    topics: filters.to_vec(),
                })
            },
            || {
                v5::Packet::Unsubscribe(v5::Unsubscribe {
                    pkid,
                    filters: filters.to_vec(),
                    properties: None,
                })
            },
        );
    }

    /// The size on the wire of a QoS 1 PUBLISH of `topic_len` and
    /// `payload_len` bytes, as [`Wire::publish`] writes it.
    pub fn publish_len(self, topic_len: usize, payload_len: usize) -> usize {
        let properties = usize::from(self.0 == MqttVersion::V5);
        let remaining = 2 + topic_len + 2 + properties + payload_len;
        let length_bytes = match remaining {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        };
        1 + length_bytes + remaining
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
            refused: (a.code != v4::ConnectReturnCode::Success).then(|| Refusal {
                why: format!("{:?}", a.code),
                unavailable: a.code == v4::ConnectReturnCode::ServiceUnavailable,
            }),
            limits: Limits::default(),
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
        v4::Packet::UnsubAck(a) => Incoming::UnsubAck { pkid: a.pkid },
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

/// What the v5 codec lets through and MQTT 5 does not: a PUBLISH topic
/// that is not UTF-8 (3.1.1's codec refuses it itself), and a Topic Alias,
/// which the hub never allows (its CONNECT sets no Topic Alias Maximum).
fn checked_v5(p: &v5::Packet) -> Result<(), Malformed> {
    let v5::Packet::Publish(publish) = p else {
        return Ok(());
    };
    if std::str::from_utf8(&publish.topic).is_err() {
        return Err(Malformed("TopicNotUtf8".into()));
    }
    if let Some(alias) = publish.properties.as_ref().and_then(|p| p.topic_alias) {
        return Err(Malformed(format!(
            "a Topic Alias ({alias}), which the hub does not allow"
        )));
    }
    Ok(())
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(a) => {
            let limits = a.properties.as_ref().map_or(Limits::default(), |p| Limits {
                receive_max: p.receive_max,
                max_packet_size: p.max_packet_size,
            });
            Incoming::ConnAck {
                refused: (a.code != v5::ConnectReturnCode::Success).then(|| {
                    let why = a.properties.and_then(|p| p.reason_string);
                    let unavailable = matches!(
                        a.code,
                        v5::ConnectReturnCode::ServerUnavailable
                            | v5::ConnectReturnCode::ServerBusy
                    );
                    Refusal {
                        why: format!(
                            "{:?}{}",
                            a.code,
                            why.map(|w| format!(": {w}")).unwrap_or_default()
                        ),
                        unavailable,
                    }
                }),
                limits,
            }
        }
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
        v5::Packet::UnsubAck(a) => Incoming::UnsubAck { pkid: a.pkid },
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
    fn an_mqtt5_publish_with_a_topic_not_utf8_or_a_topic_alias_is_malformed() {
        // PUBLISH QoS 0, topic "a\xff", no properties, payload "x"
        let mut bad_topic = BytesMut::from(&b"\x30\x06\x00\x02a\xff\x00x"[..]);
        assert!(Wire(MqttVersion::V5).read(&mut bad_topic).is_err());
        // PUBLISH QoS 0, topic "a", Topic Alias 0 (0x23 0x0000), payload "x"
        let mut alias = BytesMut::from(&b"\x30\x08\x00\x01a\x03\x23\x00\x00x"[..]);
        let err = Wire(MqttVersion::V5).read(&mut alias).unwrap_err();
        assert!(err.0.contains("Topic Alias"), "{err:?}");
        let mut fine = BytesMut::from(&b"\x30\x05\x00\x01a\x00x"[..]);
        assert!(matches!(
            Wire(MqttVersion::V5).read(&mut fine),
            Ok(Some(Incoming::Publish { .. }))
        ));
    }

    #[test]
    fn an_mqtt5_connack_tells_the_receive_maximum_and_packet_size_and_a_311_one_nothing() {
        let mut buf = BytesMut::new();
        let properties = v5::ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(5),
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(2000),
            assigned_client_identifier: None,
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
        };
        let connack = v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: Some(properties),
        };
        v5::Packet::ConnAck(connack).write(&mut buf, None).unwrap();
        let limits = Limits {
            receive_max: Some(5),
            max_packet_size: Some(2000),
        };
        assert_eq!(
            Wire(MqttVersion::V5).read(&mut buf).unwrap(),
            Some(Incoming::ConnAck {
                refused: None,
                limits
            })
        );
        v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, false))
            .write(&mut buf, usize::MAX)
            .unwrap();
        assert_eq!(
            Wire(MqttVersion::V311).read(&mut buf).unwrap(),
            Some(Incoming::ConnAck {
                refused: None,
                limits: Limits::default()
            })
        );
    }

    #[test]
    fn the_announced_publish_length_is_the_length_written() {
        for version in [MqttVersion::V311, MqttVersion::V5] {
            let wire = Wire(version);
            for payload_len in [
                0, 100, 120, 123, 124, 125, 16_370, 16_380, 2_097_140, 2_097_150,
            ] {
                let payload = vec![b'x'; payload_len];
                let mut out = BytesMut::new();
                wire.publish(&mut out, "a/b", &payload, 7, false);
                assert_eq!(
                    wire.publish_len(3, payload_len),
                    out.len(),
                    "{version:?}, payload {payload_len}"
                );
            }
        }
    }
}
