//! The cloud's MQTT session for `edgehub cloud`: one short connection to the
//! upstream broker, over the hub's own transports (TCP, TLS, WebSocket,
//! proxy) and packet framing, so it reaches every broker the hub reaches.
//!
//! Owns pairing each request with its acknowledgement and reading what the
//! broker holds retained. It does not decide what to publish (the commands
//! in `cloud::run` do) and does not retry: a command either completes or
//! says why not.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tokio::time::Instant;

use super::CloudError;
use crate::config::{MqttVersion, UpstreamAddr};
use crate::packet_id::PacketIds;
use crate::upstream::connection::{Connection, Login};
use crate::upstream::transport::{self, Transport};
use crate::upstream::wire::Incoming;

/// How long the broker has to acknowledge a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: u16 = 30;

/// Where the cloud's broker is and how to sign in: the options of the hub's
/// own upstream connection.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// The broker: `mqtt://host:port`, `mqtts://host:port`, `ws://...` or
    /// `wss://...`, as the hub's `--upstream`.
    #[arg(long, env = "EDGEHUB_CLOUD_BROKER", value_parser = UpstreamAddr::parse)]
    pub broker: UpstreamAddr,
    /// PEM CA bundle that verifies an `mqtts://` or `wss://` broker.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    #[arg(long, requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    #[arg(long, env = "EDGEHUB_CLOUD_USERNAME")]
    pub username: Option<String>,
    #[arg(long, env = "EDGEHUB_CLOUD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// The client id of this tool's session (default: a fresh one).
    #[arg(long)]
    pub client_id: Option<String>,
}

/// A message the broker delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
}

/// One session on the cloud's broker.
pub struct CloudClient {
    conn: Connection,
    ids: PacketIds,
    client_id: String,
    /// Messages that arrived while a request waited for its answer.
    early: VecDeque<Message>,
    last_sent: Instant,
}

impl CloudClient {
    /// Connects and signs in (clean session: this tool keeps nothing).
    pub async fn connect(args: &BrokerArgs) -> Result<Self, CloudError> {
        let tls = match (&args.ca, args.broker.tls) {
            (Some(ca), _) => Some(transport::tls_config(
                ca,
                args.cert.as_deref().zip(args.key.as_deref()),
            )?),
            (None, true) => {
                return Err(CloudError::Invalid(format!(
                    "{} needs --ca to verify the broker",
                    args.broker
                )))
            }
            (None, false) => None,
        };
        let client_id = args.client_id.clone().unwrap_or_else(|| {
            use rand::Rng;
            format!("edgehub-cloud-{:08x}", rand::thread_rng().gen::<u32>())
        });
        let login = Login {
            client_id: client_id.clone(),
            username: args.username.clone(),
            password: args.password.clone(),
            sas: None,
            keep_alive: KEEP_ALIVE,
            clean_session: true,
            version: MqttVersion::V311,
        };
        let transport = Transport { tls, proxy: None };
        let conn = Connection::open(&transport, &args.broker, &login).await?;
        Ok(CloudClient {
            conn,
            ids: PacketIds::default(),
            client_id,
            early: VecDeque::new(),
            last_sent: Instant::now(),
        })
    }

    fn next_id(&mut self) -> u16 {
        // One request is in flight at a time: any id will do.
        self.ids.next(|_| false).expect("a free packet id")
    }

    async fn flush(&mut self) -> Result<(), CloudError> {
        self.conn.flush().await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Subscribes at QoS 1 and waits for the broker to grant every filter.
    pub async fn subscribe(&mut self, filters: &[String]) -> Result<(), CloudError> {
        let pkid = self.next_id();
        let wire = self.conn.wire();
        wire.subscribe(pkid, filters, &mut self.conn.write_buf);
        self.flush().await?;
        match self
            .answer(|p| matches!(p, Incoming::SubAck { pkid: id, .. } if *id == pkid))
            .await?
        {
            Incoming::SubAck { refused, .. } => match refused.iter().position(|&r| r) {
                Some(i) => Err(CloudError::SubscriptionRefused(filters[i].clone())),
                None => Ok(()),
            },
            _ => unreachable!("answer returns what it matched"),
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Result<(), CloudError> {
        let pkid = self.next_id();
        let wire = self.conn.wire();
        wire.publish(&mut self.conn.write_buf, topic, payload, pkid, retain);
        self.flush().await?;
        match self
            .answer(|p| matches!(p, Incoming::PubAck { pkid: id, .. } if *id == pkid))
            .await?
        {
            Incoming::PubAck { reason, .. } if reason >= 0x80 => Err(CloudError::PublishRefused {
                topic: topic.to_string(),
                reason,
            }),
            _ => Ok(()),
        }
    }

    /// Waits for the packet `wanted` picks, keeping messages that come first.
    async fn answer(&mut self, wanted: impl Fn(&Incoming) -> bool) -> Result<Incoming, CloudError> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let packet = tokio::time::timeout_at(deadline, self.conn.next())
                .await
                .map_err(|_| CloudError::NoAnswer(ANSWER_TIMEOUT))??;
            if wanted(&packet) {
                return Ok(packet);
            }
            if let Some(m) = self.take(packet).await? {
                self.early.push_back(m);
            }
        }
    }

    /// Acknowledges a delivery and returns it; ends on a DISCONNECT.
    async fn take(&mut self, packet: Incoming) -> Result<Option<Message>, CloudError> {
        match packet {
            Incoming::Publish {
                topic,
                payload,
                qos,
                pkid,
            } => {
                if qos > 0 {
                    let wire = self.conn.wire();
                    wire.puback(pkid, &mut self.conn.write_buf);
                    self.flush().await?;
                }
                Ok(Some(Message { topic, payload }))
            }
            Incoming::Disconnect { .. } => {
                Err(CloudError::Upstream(crate::upstream::UpstreamError::Closed))
            }
            _ => Ok(None),
        }
    }

    /// The next message delivered before `until` (pinging the broker while
    /// it waits), or `None` at `until`.
    pub async fn next_message(
        &mut self,
        until: Option<Instant>,
    ) -> Result<Option<Message>, CloudError> {
        if let Some(m) = self.early.pop_front() {
            return Ok(Some(m));
        }
        let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE) / 2);
        loop {
            let ping_at = self.last_sent + ping_every;
            let wake = until.map_or(ping_at, |u| u.min(ping_at));
            tokio::select! {
                packet = self.conn.next() => {
                    if let Some(m) = self.take(packet?).await? {
                        return Ok(Some(m));
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return Ok(None);
                    }
                    let wire = self.conn.wire();
                    wire.pingreq(&mut self.conn.write_buf);
                    self.flush().await?;
                }
            }
        }
    }

    /// What the broker holds retained under `filter`: subscribes to it and
    /// to a topic of this session's own, publishes to the latter, and takes
    /// what arrives before that publish comes back (a broker sends a new
    /// subscription's retained messages before later publishes).
    pub async fn retained(&mut self, filter: &str) -> Result<Vec<Message>, CloudError> {
        let marker = format!("edgehub-cloud/{}/sync", self.client_id);
        self.subscribe(&[filter.to_string(), marker.clone()])
            .await?;
        self.publish(&marker, b"", false).await?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut out = Vec::new();
        loop {
            match self.next_message(Some(deadline)).await? {
                None => return Err(CloudError::NoAnswer(ANSWER_TIMEOUT)),
                Some(m) if m.topic == marker => break,
                Some(m) if !m.payload.is_empty() => out.push(m),
                // An empty retained message is a deleted one.
                Some(_) => {}
            }
        }
        let wire = self.conn.wire();
        wire.unsubscribe(
            self.next_id(),
            &[filter.to_string(), marker],
            &mut self.conn.write_buf,
        );
        self.flush().await?;
        Ok(out)
    }

    /// The one retained message on `topic`, if any.
    pub async fn retained_one(&mut self, topic: &str) -> Result<Option<Bytes>, CloudError> {
        Ok(self
            .retained(topic)
            .await?
            .into_iter()
            .find(|m| m.topic == topic)
            .map(|m| m.payload))
    }

    /// Says goodbye (DISCONNECT), so the broker drops the session at once.
    pub async fn close(mut self) {
        let wire = self.conn.wire();
        wire.disconnect(&mut self.conn.write_buf);
        let _ = self.flush().await;
    }
}
