//! Fuzz targets: each takes arbitrary bytes and hands them to one parser of
//! untrusted input, as the hub uses it (bytes from devices, the cloud's
//! documents and the cloud broker's packets, plugins' route text, and what
//! the store reads back from disk). Whatever
//! the bytes, a target must return: no panic, no hang, no unbounded
//! allocation.
//!
//! `fuzz/` runs these coverage-guided with cargo-fuzz (the long runs,
//! docs/reliability.md); the unit tests below run each over mutated seeds on
//! every `cargo test` (the short form in CI). Owns no parser: each target
//! only calls the hub's own.

use bytes::BytesMut;

use crate::mqtt::codec::{self, Codec, Protocol};

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/` names them.
pub const TARGETS: &[(&str, Target)] = &[
    ("mqtt_session", mqtt_session),
    ("route", route),
    ("sas", sas),
    ("scope", scope),
    ("twin", twin),
    ("iothub_topic", iothub_topic),
    ("stored_record", stored_record),
    ("upstream_reader", upstream_reader),
];

/// Packet size limit the targets read with (the hub's default is larger;
/// a small one also reaches the "too large" paths).
const MAX_PACKET: usize = 64 * 1024;

/// A connection's bytes as a session reads them: a CONNECT, then packets
/// for the version it asked for (or, if it is not one, for both).
pub fn mqtt_session(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let protocols = match codec::read_connect(&mut buf, MAX_PACKET) {
        Ok(Some(connect)) => vec![connect.protocol],
        _ => {
            buf = BytesMut::from(data);
            vec![Protocol::V4, Protocol::V5]
        }
    };
    for protocol in protocols {
        let codec = Codec {
            protocol,
            max_size: MAX_PACKET,
        };
        let mut buf = buf.clone();
        // Each packet takes at least two bytes, so this ends.
        while let Ok(Some(_)) = codec.read(&mut buf) {}
    }
}

/// A route as written in the config file or the hub twin.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::routing::rules::Route::parse("fuzz", &text);
}

/// A device's MQTT username and SAS token password.
pub fn sas(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::auth::sas::parse_username(&text);
    let _ = crate::auth::sas::parse_token(&text);
}

/// The device scope document from the cloud.
pub fn scope(data: &[u8]) {
    let _ = crate::auth::Scope::parse("edge", data);
}

/// Twin documents: a reported patch from a device, a desired document
/// from the cloud, and merging the one into the other.
pub fn twin(data: &[u8]) {
    use crate::twins::document;
    let patch = document::reported_patch(data);
    if let Ok((mut desired, _)) = document::versioned_document(data) {
        if let Ok(patch) = &patch {
            document::merge(&mut desired, patch);
            let _ = document::diff(&desired, patch);
        }
    }
}

/// A topic a device publishes or subscribes to under `$iothub/`.
pub fn iothub_topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::iothub::Request::parse(&text);
}

/// What the store reads back from disk: a queued record, a dead letter, a
/// local broker session's queued delivery and its key.
pub fn stored_record(data: &[u8]) {
    let _ = crate::store::Record::decode(data);
    let _ = crate::store::record::RecordRef::parse(data);
    let _ = crate::store::dead_letters::decode(data);
    let _ = crate::broker::durable::decode(data);
    let _ = crate::broker::durable::parse_queue_key(data);
}

/// What the cloud broker sends the hub's upstream connection, as the link
/// reads it: packets of MQTT 3.1.1 and of 5, each taken by a connection's
/// protocol state (a subscription pending, so a SUBACK has one to match),
/// and every QoS 1 publish acknowledged as its consumer would.
pub fn upstream_reader(data: &[u8]) {
    use crate::config::MqttVersion;
    use crate::upstream::state::{Inbound, LinkState};
    use crate::upstream::wire::Wire;
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let wire = Wire(version);
        let mut state = LinkState::new(1, wire);
        let mut out = BytesMut::new();
        state.subscribe(&["devices/d/#".to_string()], &mut out);
        let mut buf = BytesMut::from(data);
        // Each packet takes at least two bytes, so this ends.
        while let Ok(Some(packet)) = wire.read(&mut buf) {
            if let Inbound::Cloud {
                pkid: Some(pkid), ..
            } = state.receive(packet)
            {
                state.consumed(1, pkid, &mut out);
            }
            out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs per target on every `cargo test`: a few seconds in all.
    const RUNS: usize = 100_000;

    /// Valid inputs to mutate from, so the runs get past the first checks.
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let v = |s: &str| s.as_bytes().to_vec();
        match target {
            "mqtt_session" => vec![
                // CONNECT 3.1.1 "c", SUBSCRIBE a/# QoS 1, PUBLISH QoS 1, PINGREQ
                b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c\x82\x08\x00\x01\x00\x03a/#\x01\x32\x09\x00\x03a/b\x00\x02hi\xc0\x00".to_vec(),
                // CONNECT 5 "c", PUBLISH QoS 2 with a property, DISCONNECT
                b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01c\x34\x0c\x00\x03a/b\x00\x07\x02\x01\x01hi\xe0\x00".to_vec(),
            ],
            "route" => vec![
                v("FROM /messages/modules/m/outputs/* WHERE $connectionDeviceId = 'd' AND (temp > 20.5 OR NOT IS_DEFINED($body.x)) INTO BrokeredEndpoint(\"/modules/n/inputs/i\")"),
                v("FROM /messages/* WHERE UPPER(level) IN ['A', 'B'] INTO $upstream"),
            ],
            "sas" => vec![
                v("hub.azure-devices.net/dev1/?api-version=2021-04-12"),
                v("SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fdev1&sig=abc%3D&se=1900000000&skn=key"),
            ],
            "scope" => vec![v(r#"{"version":3,"identities":[{"deviceId":"d1","parent":"edge","auth":{"type":"sas","primaryKey":"a2V5"}},{"deviceId":"edge","moduleId":"m","auth":{"type":"x509","thumbprint":"AB"}}]}"#)],
            "twin" => vec![v(r#"{"a":{"b":[1,2.5,"x",true]},"c":null,"$version":4}"#)],
            "iothub_topic" => vec![
                v("$iothub/twin/PATCH/properties/reported/?$rid=1"),
                v("$iothub/methods/res/200/?$rid=9"),
            ],
            "stored_record" => {
                let record = crate::store::Record {
                    enqueued_ms: 1,
                    topic: "devices/d/messages/events/".into(),
                    payload: bytes::Bytes::from_static(b"hi"),
                    ttl_secs: Some(5),
                    priority: 0,
                };
                let mut delivery = vec![1u8];
                delivery.extend_from_slice(&record.encode());
                vec![record.encode().to_vec(), delivery]
            }
            "upstream_reader" => vec![
                // 3.1.1: CONNACK, SUBACK (granted 1), PUBLISH QoS 1, PUBACK, PINGRESP
                b"\x20\x02\x00\x00\x90\x03\x00\x01\x01\x32\x09\x00\x03a/b\x00\x01hi\x40\x02\x00\x01\xd0\x00".to_vec(),
                // 5: CONNACK (receive maximum 10, maximum packet size 4096),
                // PUBLISH QoS 1, PUBACK 0x97, SUBACK 0x80, DISCONNECT 0x8e
                b"\x20\x0b\x00\x00\x08\x21\x00\x0a\x27\x00\x00\x10\x00\x32\x0a\x00\x03a/b\x00\x01\x00hi\x40\x04\x00\x01\x97\x00\x90\x04\x00\x01\x00\x80\xe0\x02\x8e\x00".to_vec(),
            ],
            _ => vec![Vec::new()],
        }
    }

    /// xorshift64*: the runs are the same on every machine.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        const INTERESTING: [u8; 8] = [0, 1, 0x7F, 0x80, 0xFF, b'/', b'#', b'$'];
        for _ in 0..=rng.below(4) {
            let len = input.len();
            match rng.below(6) {
                0 if len > 0 => input[rng.below(len)] ^= 1 << rng.below(8),
                1 if len > 0 => input[rng.below(len)] = INTERESTING[rng.below(8)],
                2 => input.insert(rng.below(len + 1), rng.next() as u8),
                3 if len > 0 => {
                    let at = rng.below(len);
                    input.drain(at..(at + rng.below(8)).min(len));
                }
                4 if len > 0 => {
                    let at = rng.below(len);
                    let chunk = input[at..(at + rng.below(16)).min(len)].to_vec();
                    let to = rng.below(input.len() + 1);
                    input.splice(to..to, chunk);
                }
                _ => input.truncate(rng.below(len + 1)),
            }
        }
    }

    #[test]
    fn the_upstream_reader_seeds_are_whole_packets_of_their_version() {
        use crate::config::MqttVersion;
        use crate::upstream::wire::Wire;
        let seeds = seeds("upstream_reader");
        for (seed, version, packets) in [
            (&seeds[0], MqttVersion::V311, 5),
            (&seeds[1], MqttVersion::V5, 5),
        ] {
            let mut buf = BytesMut::from(&seed[..]);
            let mut n = 0;
            while let Ok(Some(_)) = Wire(version).read(&mut buf) {
                n += 1;
            }
            assert_eq!((n, buf.len()), (packets, 0), "{version:?}");
        }
    }

    #[test]
    fn every_fuzz_target_survives_mutated_and_random_input() {
        for &(name, target) in TARGETS {
            let seeds = seeds(name);
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
            for seed in &seeds {
                target(seed);
            }
            for run in 0..RUNS {
                let mut input = if run % 10 == 0 {
                    (0..rng.below(256)).map(|_| rng.next() as u8).collect()
                } else {
                    seeds[rng.below(seeds.len())].clone()
                };
                mutate(&mut rng, &mut input);
                target(&input);
            }
        }
    }
}
