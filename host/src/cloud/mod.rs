//! `edgehub cloud`: the cloud's side of the upstream protocol, for a user
//! whose cloud is their own broker (Mosquitto, EMQX, HiveMQ, NATS). It
//! provisions identities into edges' scopes, deploys the hub's routes, reads
//! and sets twins, calls direct methods, sends cloud-to-device messages and
//! prints the telemetry that arrives.
//!
//! Owns the commands and what they print. Topics, bodies and validation are
//! the hub's own (`protocol`, `auth::scope`, `twins::document`,
//! `twin`): what this tool publishes is checked by the same code that will
//! read it. The MQTT session is `client`; the registry rules `registry`;
//! manifests `manifest`. Docs: docs/cloud.md.

pub mod client;
pub mod manifest;
pub mod registry;

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::auth::scope::AuthDoc;
use crate::message::dialect::{self, Telemetry};
use crate::protocol::{self, MethodRequest, MethodResponse};
use crate::twins::document;
use crate::upstream::UpstreamError;
use client::{BrokerArgs, CloudClient};
use registry::{Registry, Which};

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the broker refused the subscription to {0}")]
    SubscriptionRefused(String),
    #[error("the broker refused the publish to {topic} (reason {reason:#04x})")]
    PublishRefused { topic: String, reason: u8 },
    #[error("the broker did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("{0}")]
    NotFound(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

/// `edgehub cloud ...`
#[derive(Debug, Args)]
pub struct CloudArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: CloudCommand,
}

#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// The identities edges may authenticate offline (their device scopes).
    Scope {
        #[command(subcommand)]
        command: ScopeCommand,
    },
    /// Print an identity's connection string (its primary key).
    ConnectionString {
        /// `{device}` or `{edge}/{module}`.
        identity: String,
        /// The IoT hub host name devices sign in to (`HostName=`).
        #[arg(long)]
        hub: String,
        /// The gateway devices connect through (`GatewayHostName=`; default:
        /// the identity's edge).
        #[arg(long)]
        gateway: Option<String>,
        /// Use the secondary key.
        #[arg(long)]
        secondary: bool,
    },
    /// Print a SAS token for an identity.
    Token {
        identity: String,
        #[arg(long)]
        hub: String,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[arg(long)]
        secondary: bool,
    },
    /// Publish a deployment manifest's hub settings (routes, time to live,
    /// plugins) as an edge's `$edgeHub` desired properties, after checking it.
    Deploy {
        /// The manifest: Azure IoT Edge's shape
        /// (`modulesContent.$edgeHub["properties.desired"]`) or that object.
        manifest: std::path::PathBuf,
        #[arg(long)]
        edge: String,
    },
    /// Read or change a twin (`{device}`, `{edge}/{module}`, `{edge}/$edgeHub`).
    Twin {
        #[command(subcommand)]
        command: TwinCommand,
    },
    /// Call a direct method and print `{"status": ..., "payload": ...}`.
    /// Exit status 0 for a 2xx answer, 1 otherwise.
    Invoke {
        /// `{device}` or `{edge}/{module}`.
        identity: String,
        method: String,
        /// The method's payload (JSON).
        #[arg(long, default_value = "null")]
        payload: String,
        /// Seconds the device has to answer (5 to 300).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds the hub waits for the device to connect (0 to 300).
        #[arg(long, default_value_t = 0)]
        connect_timeout: u64,
    },
    /// Send a cloud-to-device message; prints its message id.
    C2d {
        device: String,
        /// The message body.
        text: String,
        /// An application property, `key=value` (repeatable).
        #[arg(long = "prop", value_parser = key_value)]
        props: Vec<(String, String)>,
        /// Seconds until the message expires undelivered.
        #[arg(long)]
        expiry_secs: Option<u64>,
    },
    /// Print the telemetry that arrives, one JSON object per line.
    Tail {
        /// Only this device (and its modules).
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        for_secs: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScopeCommand {
    /// One JSON line per identity: edge, identity, parent, how it signs in
    /// (never its keys).
    List {
        /// Only this edge's scope.
        #[arg(long)]
        edge: Option<String>,
    },
    /// Register an edge device (an empty scope of its own).
    AddEdge { edge: String },
    /// Add a child device (`--parent`: its edge) or a module (`{edge}/{module}`)
    /// with fresh symmetric keys, or with certificates.
    Add {
        identity: String,
        #[arg(long)]
        parent: Option<String>,
        /// Sign in with a certificate of this SHA-1 or SHA-256 thumbprint
        /// (hex; give it twice for a secondary).
        #[arg(long = "x509-thumbprint", num_args = 1, conflicts_with = "x509_ca")]
        thumbprints: Vec<String>,
        /// Sign in with a certificate issued by the hub's trusted CA.
        #[arg(long)]
        x509_ca: bool,
    },
    /// Move a child device to another edge (keeps its credentials).
    SetParent { device: String, parent: String },
    /// New symmetric keys for an identity.
    RotateKey {
        identity: String,
        #[arg(long, value_enum, default_value = "primary")]
        which: Which,
    },
    /// Remove an identity from its edge's scope.
    Remove { identity: String },
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Print `{"desired": ..., "reported": ...}` as the broker holds them.
    Get { identity: String },
    /// Merge a patch into the desired properties (JSON merge patch: `null`
    /// removes a key) and publish them with the next `$version`.
    Set {
        identity: String,
        /// The patch (a JSON object).
        #[arg(long)]
        desired: String,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Runs one command; returns the process's exit status.
pub async fn run(args: CloudArgs) -> Result<u8, CloudError> {
    if let CloudCommand::Scope { command } = args.command {
        // Changes take the scope writer's session: see `edit_scopes`.
        return scope(&args.broker, command).await;
    }
    let mut cloud = CloudClient::connect(&args.broker).await?;
    let status = command(&mut cloud, args.command).await;
    cloud.close().await;
    status
}

async fn command(cloud: &mut CloudClient, command: CloudCommand) -> Result<u8, CloudError> {
    match command {
        CloudCommand::Scope { .. } => unreachable!("run() takes scope commands"),
        CloudCommand::ConnectionString {
            identity,
            hub,
            gateway,
            secondary,
        } => {
            let registry = read_registry(cloud).await?;
            let (edge, key) = sas_key(&registry, &identity, secondary)?;
            let (device, module) = split(&identity);
            let module = module.map(|m| format!("ModuleId={m};")).unwrap_or_default();
            let gateway = gateway.unwrap_or_else(|| edge.to_string());
            println!("HostName={hub};DeviceId={device};{module}SharedAccessKey={key};GatewayHostName={gateway}");
            Ok(0)
        }
        CloudCommand::Token {
            identity,
            hub,
            ttl_secs,
            secondary,
        } => {
            use base64::Engine;
            let registry = read_registry(cloud).await?;
            let (_, key) = sas_key(&registry, &identity, secondary)?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_err(|e| CloudError::Invalid(format!("{identity}'s key is not base64: {e}")))?;
            let resource = format!("{hub}/{}", protocol::identity_root(&identity));
            let expiry = crate::clock::wall_ms() / 1000 + ttl_secs;
            println!("{}", crate::auth::sas::make_token(&key, &resource, expiry));
            Ok(0)
        }
        CloudCommand::Deploy { manifest, edge } => {
            let text = std::fs::read_to_string(&manifest).map_err(|error| CloudError::Read {
                path: manifest.display().to_string(),
                error,
            })?;
            let desired = manifest::hub_desired(&manifest.display().to_string(), &text)?;
            if !read_registry(cloud).await?.scopes.contains_key(&edge) {
                // Not refused: a hub without a scope (anonymous devices)
                // takes routes too, and registering an edge gives it one.
                eprintln!("note: {edge} has no scope on this broker (a typo?); deploying anyway");
            }
            let version =
                publish_desired(cloud, &protocol::hub_twin_identity(&edge), desired).await?;
            eprintln!("deployed to {edge} as $version {version}");
            Ok(0)
        }
        CloudCommand::Twin { command } => twin(cloud, command).await,
        CloudCommand::Invoke {
            identity,
            method,
            payload,
            timeout,
            connect_timeout,
        } => {
            invoke(
                cloud,
                &identity,
                &method,
                &payload,
                timeout,
                connect_timeout,
            )
            .await
        }
        CloudCommand::C2d {
            device,
            text,
            props,
            expiry_secs,
        } => {
            if device.contains('/') {
                return Err(CloudError::Invalid(format!(
                    "{device}: cloud-to-device messages go to devices, not modules"
                )));
            }
            let mid = format!("{:016x}", rand::random::<u64>());
            let mut bag = String::new();
            dialect::push_property(&mut bag, "$.mid", &mid);
            if let Some(secs) = expiry_secs {
                let at = time::OffsetDateTime::now_utc() + Duration::from_secs(secs);
                let at = at
                    .format(&time::format_description::well_known::Rfc3339)
                    .expect("a time formats");
                dialect::push_property(&mut bag, "$.exp", &at);
            }
            for (k, v) in &props {
                dialect::push_property(&mut bag, k, v);
            }
            let topic = format!("devices/{device}/messages/devicebound/{bag}");
            cloud.publish(&topic, text.as_bytes(), false).await?;
            println!("{mid}");
            Ok(0)
        }
        CloudCommand::Tail {
            device,
            count,
            for_secs,
        } => tail(cloud, device, count, for_secs).await,
    }
}

fn split(identity: &str) -> (&str, Option<&str>) {
    match identity.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (identity, None),
    }
}

async fn read_registry(cloud: &mut CloudClient) -> Result<Registry, CloudError> {
    let docs = cloud.retained(&protocol::scope_topic("+")).await?;
    Ok(Registry::read(
        docs.iter().map(|m| (m.topic.as_str(), &m.payload[..])),
    ))
}

fn sas_key<'r>(
    registry: &'r Registry,
    identity: &str,
    secondary: bool,
) -> Result<(&'r str, &'r str), CloudError> {
    let (edge, entry) = registry
        .find(identity)
        .ok_or_else(|| CloudError::NotFound(format!("{identity} is in no edge's scope")))?;
    match &entry.auth {
        AuthDoc::Sas { primary_key, .. } if !secondary => Ok((edge, primary_key)),
        AuthDoc::Sas {
            secondary_key: Some(k),
            ..
        } => Ok((edge, k)),
        AuthDoc::Sas { .. } => Err(CloudError::NotFound(format!(
            "{identity} has no secondary key"
        ))),
        _ => Err(CloudError::Refused(format!(
            "{identity} signs in with a certificate: it has no key"
        ))),
    }
}

async fn scope(broker: &BrokerArgs, command: ScopeCommand) -> Result<u8, CloudError> {
    // What the command changes, and the identity (or edge) it is about.
    let (name, edit): (String, Box<Edit>) = match command {
        ScopeCommand::List { edge } => {
            let mut cloud = CloudClient::connect(broker).await?;
            let registry = read_registry(&mut cloud).await;
            cloud.close().await;
            let registry = registry?;
            let known =
                |e: &str| registry.scopes.contains_key(e) || registry.unreadable.contains_key(e);
            if let Some(e) = edge.as_deref().filter(|e| !known(e)) {
                return Err(CloudError::NotFound(format!("no edge {e}")));
            }
            let wanted = |e: &str| edge.as_deref().is_none_or(|want| want == e);
            for (e, doc) in registry.scopes.iter().filter(|(e, _)| wanted(e)) {
                if doc.identities.is_empty() {
                    let line = json!({"edge": e, "version": doc.version, "identity": null, "parent": null, "auth": null});
                    println!("{line}");
                }
                for entry in &doc.identities {
                    let auth = match entry.auth {
                        AuthDoc::Sas { .. } => "sas",
                        AuthDoc::X509Thumbprint { .. } => "x509Thumbprint",
                        AuthDoc::X509Ca => "x509Ca",
                    };
                    let line = json!({"edge": e, "version": doc.version, "identity": entry.name(),
                        "parent": entry.parent, "auth": auth});
                    println!("{line}");
                }
            }
            let mut status = 0;
            for (e, why) in registry.unreadable.iter().filter(|(e, _)| wanted(e)) {
                println!("{}", json!({"edge": e, "error": why}));
                eprintln!("{}", registry.check_readable(e).unwrap_err());
                status = 1;
            }
            return Ok(status);
        }
        ScopeCommand::AddEdge { edge } => (
            edge.clone(),
            Box::new(move |r: &mut Registry| Ok(vec![r.add_edge(&edge)?])),
        ),
        ScopeCommand::Add {
            identity,
            parent,
            thumbprints,
            x509_ca,
        } => {
            let auth = match (thumbprints.as_slice(), x509_ca) {
                (_, true) => AuthDoc::X509Ca,
                ([], false) => registry::new_sas(),
                ([primary], false) => AuthDoc::X509Thumbprint {
                    primary_thumbprint: primary.clone(),
                    secondary_thumbprint: None,
                },
                ([primary, secondary], false) => AuthDoc::X509Thumbprint {
                    primary_thumbprint: primary.clone(),
                    secondary_thumbprint: Some(secondary.clone()),
                },
                _ => {
                    return Err(CloudError::Invalid(
                        "at most two --x509-thumbprint (primary, secondary)".into(),
                    ))
                }
            };
            let name = identity.clone();
            (
                name,
                Box::new(move |r: &mut Registry| {
                    Ok(vec![r.add(&identity, parent.as_deref(), auth.clone())?])
                }),
            )
        }
        ScopeCommand::SetParent { device, parent } => (
            device.clone(),
            Box::new(move |r: &mut Registry| r.set_parent(&device, &parent)),
        ),
        ScopeCommand::RotateKey { identity, which } => (
            identity.clone(),
            Box::new(move |r: &mut Registry| Ok(vec![r.rotate(&identity, which)?])),
        ),
        ScopeCommand::Remove { identity } => (
            identity.clone(),
            Box::new(move |r: &mut Registry| r.remove(&identity)),
        ),
    };
    edit_scopes(broker, &name, edit).await
}

/// A change to the registry; returns the edges whose documents changed.
type Edit = dyn FnMut(&mut Registry) -> Result<Vec<String>, CloudError>;

/// Attempts at a scope change while other changes take the writer's session.
const EDIT_ATTEMPTS: u32 = 8;

/// The client id every scope change connects with. MQTT lets one session
/// per client id live: a second change connecting closes the first one's
/// connection, so two changes never read and publish at the same time (the
/// broker has no compare-and-set to offer). The change that lost its
/// session tries again on what the broker holds then.
pub const SCOPE_WRITER: &str = "edgehub-cloud-scope-writer";

/// Makes the change `edit` in the writer's session, trying again (after a
/// random pause) while other changes take the session away.
async fn edit_scopes(
    broker: &BrokerArgs,
    name: &str,
    mut edit: Box<Edit>,
) -> Result<u8, CloudError> {
    let mut args = broker.clone();
    args.client_id = Some(SCOPE_WRITER.into());
    let mut wanted: Option<Registry> = None;
    let mut last = None;
    for attempt in 0..EDIT_ATTEMPTS {
        if attempt > 0 {
            let pause = rand::random::<u64>() % (20 << attempt.min(5));
            tokio::time::sleep(Duration::from_millis(10 + pause)).await;
        }
        // A clustered broker can close the writer's CONNECT as well as its
        // session: NATS holds a client id that was just taken over for a
        // second and then closes it, and a node that learns late of the
        // session on another node closes the newer connection.
        let result = match CloudClient::connect(&args).await {
            Ok(mut cloud) => {
                let result = edit_once(&mut cloud, name, &mut edit, &mut wanted).await;
                if !result.as_ref().is_err_and(session_lost) {
                    cloud.close().await;
                }
                result
            }
            // (not a timeout: a broker that does not answer at all gets
            // one handshake's wait, not one per attempt)
            Err(e @ CloudError::Upstream(UpstreamError::Closed | UpstreamError::Io(_))) => Err(e),
            Err(e) => return Err(e),
        };
        match result {
            Err(e) if session_lost(&e) => {
                eprintln!("the broker closed the scope writer's session ({e}); trying again");
                last = Some(e);
            }
            other => return other,
        }
    }
    Err(CloudError::Refused(format!(
        "the broker kept closing the scope writer's session ({}): other scope changes, \
         or a broker that cannot keep the session; try again",
        last.map_or(String::new(), |e| e.to_string())
    )))
}

/// One attempt: read every scope, change it, publish what changed. A
/// change whose publish was taken but not acknowledged before the session
/// was lost is found done on the next attempt.
async fn edit_once(
    cloud: &mut CloudClient,
    name: &str,
    edit: &mut Box<Edit>,
    wanted: &mut Option<Registry>,
) -> Result<u8, CloudError> {
    let mut registry = read_registry(cloud).await?;
    if wanted
        .as_ref()
        .is_some_and(|w| registry::same_for(&registry, w, name))
    {
        return Ok(0);
    }
    let changed = edit(&mut registry)?;
    for edge in &changed {
        registry.check_readable(edge)?;
    }
    *wanted = Some(registry.clone());
    for edge in changed {
        let doc = &registry.scopes[&edge];
        let body = serde_json::to_vec(doc).expect("a scope document serialises");
        cloud
            .publish(&protocol::scope_topic(&edge), &body, true)
            .await?;
        eprintln!("{edge}: scope version {} published", doc.version);
    }
    Ok(0)
}

/// Whether `e` says the connection went away (another change took the
/// session), rather than refusing the change.
fn session_lost(e: &CloudError) -> bool {
    matches!(
        e,
        CloudError::NoAnswer(_)
            | CloudError::Upstream(
                UpstreamError::Closed | UpstreamError::Io(_) | UpstreamError::Timeout
            )
    )
}

/// The twin documents the broker holds retained for `identity`.
async fn twin_documents(
    cloud: &mut CloudClient,
    identity: &str,
) -> Result<(Option<Value>, Option<Value>), CloudError> {
    let read = |body: Option<bytes::Bytes>, what: &str| -> Result<Option<Value>, CloudError> {
        body.map(|b| {
            serde_json::from_slice(&b).map_err(|e| {
                CloudError::Invalid(format!("{identity}'s {what} document is not JSON: {e}"))
            })
        })
        .transpose()
    };
    let desired = cloud
        .retained_one(&protocol::twin_topic(identity, "desired"))
        .await?;
    let reported = cloud
        .retained_one(&protocol::twin_topic(identity, "reported"))
        .await?;
    Ok((read(desired, "desired")?, read(reported, "reported")?))
}

async fn twin(cloud: &mut CloudClient, command: TwinCommand) -> Result<u8, CloudError> {
    match command {
        TwinCommand::Get { identity } => {
            let (desired, reported) = twin_documents(cloud, &identity).await?;
            println!("{}", json!({"desired": desired, "reported": reported}));
            Ok(0)
        }
        TwinCommand::Set { identity, desired } => {
            let patch: Map<String, Value> = serde_json::from_str(&desired)
                .map_err(|e| CloudError::Invalid(format!("--desired is not a JSON object: {e}")))?;
            let (current, _) = twin_documents(cloud, &identity).await?;
            let mut doc = match current {
                Some(Value::Object(o)) => o,
                _ => Map::new(),
            };
            doc.remove("$version");
            document::merge(&mut doc, &patch);
            let version = publish_desired(cloud, &identity, doc).await?;
            eprintln!("{identity}: desired $version {version} published");
            Ok(0)
        }
    }
}

/// Publishes `desired` (retained) as `identity`'s desired document with
/// the next `$version`, checked as the hub will check it.
async fn publish_desired(
    cloud: &mut CloudClient,
    identity: &str,
    mut desired: Map<String, Value>,
) -> Result<u64, CloudError> {
    let topic = protocol::twin_topic(identity, "desired");
    let previous = cloud
        .retained_one(&topic)
        .await?
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("$version").and_then(Value::as_u64))
        .unwrap_or(0);
    let version = previous + 1;
    desired.insert("$version".into(), version.into());
    let body = serde_json::to_vec(&desired).expect("a JSON object serialises");
    let checked = if identity.ends_with("/$edgeHub") {
        crate::twin::HubTwin::validate(&body).map_err(|e| e.to_string())
    } else {
        document::versioned_document(&body).map(|_| ())
    };
    checked.map_err(|e| CloudError::Invalid(format!("{identity}'s desired properties: {e}")))?;
    cloud.publish(&topic, &body, true).await?;
    Ok(version)
}

async fn invoke(
    cloud: &mut CloudClient,
    identity: &str,
    method: &str,
    payload: &str,
    timeout: u64,
    connect_timeout: u64,
) -> Result<u8, CloudError> {
    let payload: Value = serde_json::from_str(payload)
        .map_err(|e| CloudError::Invalid(format!("--payload is not JSON: {e}")))?;
    let request = MethodRequest {
        method_name: None,
        payload,
        response_timeout_in_seconds: timeout,
        connect_timeout_in_seconds: connect_timeout,
    };
    request.check().map_err(CloudError::Invalid)?;
    if method.is_empty() || method.contains(['/', '+', '#']) {
        return Err(CloudError::Invalid(format!(
            "{method:?} is not a method name"
        )));
    }
    let rid = format!("{:016x}", rand::random::<u64>());
    let root = protocol::identity_root(identity);
    cloud
        .subscribe(&[format!("{root}/methods/res/+/{rid}")])
        .await?;
    let body = serde_json::to_vec(&request).expect("a request serialises");
    cloud
        .publish(&format!("{root}/methods/{method}/{rid}"), &body, false)
        .await?;
    // The hub answers 404 or 504 itself once its timeouts pass; a little
    // more for the way there and back.
    let wait = Duration::from_secs(timeout + connect_timeout + 10);
    let deadline = Instant::now() + wait;
    while let Some(m) = cloud.next_message(Some(deadline)).await? {
        let Ok(answer) = serde_json::from_slice::<MethodResponse>(&m.payload) else {
            continue;
        };
        println!(
            "{}",
            json!({"status": answer.status, "payload": answer.payload})
        );
        return Ok(if (200..300).contains(&answer.status) {
            0
        } else {
            1
        });
    }
    eprintln!(
        "no answer within {} s: is the edge connected to this broker?",
        wait.as_secs()
    );
    Ok(1)
}

async fn tail(
    cloud: &mut CloudClient,
    device: Option<String>,
    count: Option<u64>,
    for_secs: Option<u64>,
) -> Result<u8, CloudError> {
    let d = device.as_deref().unwrap_or("+");
    cloud
        .subscribe(&[
            format!("devices/{d}/messages/events/#"),
            format!("devices/{d}/modules/+/messages/events/#"),
        ])
        .await?;
    eprintln!("listening");
    let until = for_secs.map(|s| Instant::now() + Duration::from_secs(s));
    let mut printed = 0;
    while count.is_none_or(|n| printed < n) {
        let Some(m) = cloud.next_message(until).await? else {
            break;
        };
        let Some(t) = Telemetry::parse(&m.topic) else {
            continue;
        };
        let properties: Map<String, Value> = t
            .properties()
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let mut line = json!({"device": t.device, "module": t.module, "properties": properties});
        match std::str::from_utf8(&m.payload) {
            Ok(text) => line["body"] = text.into(),
            Err(_) => {
                use base64::Engine;
                line["bodyBase64"] = base64::engine::general_purpose::STANDARD
                    .encode(&m.payload)
                    .into();
            }
        }
        println!("{line}");
        printed += 1;
    }
    Ok(0)
}
