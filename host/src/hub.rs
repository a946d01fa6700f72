//! Start-up and shutdown: builds every part from a [`Config`], runs them
//! under one cancellation token, and waits for all of them on the way out.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiContext};
use crate::auth::{Auth, CacheError};
use crate::broker;
use crate::c2d::CloudToDevice;
use crate::config::Config;
use crate::inputs::ModuleInputs;
use crate::methods::Methods;
use crate::metrics::Metrics;
use crate::monitor;
use crate::mqtt::{listener, liveness::Liveness, session::SessionContext, tls};
use crate::plugins::{self, PluginEngine, PluginPool, Registry};
use crate::routing::{PluginHost, Router, Routes, Sinks};
use crate::store::{self, Store};
use crate::twin::{self, HubTwin};
use crate::twins::Twins;
use crate::upstream::c2d::C2dSync;
use crate::upstream::methods::MethodSync;
use crate::upstream::sync::CloudSync;
use crate::upstream::twins::TwinSync;
use crate::upstream::{self, Forwarder, Link, LinkConfig, Login, Transport};
use crate::websocket::AllowedOrigins;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot start the forwarder thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create storage folder {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Broker(#[from] broker::JournalError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error(transparent)]
    Auth(#[from] CacheError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("plugin host: {0}")]
    Plugins(#[from] crate::plugins::PluginError),
    #[error("cannot watch the plugins folder {path}: {source}")]
    Watch { path: String, source: notify::Error },
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` was cancelled.
    Shutdown,
    /// The store was found damaged, or a write to it failed, while running
    /// ([`Store::broken`]): everything was stopped so that the store can be
    /// opened again, which repairs it. Run the hub again.
    StoreBroken,
}

/// Runs the hub until `shutdown` is cancelled or its store breaks, then
/// stops every task.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Stopped, HubError> {
    // Every part stops on this token: cancelled with `shutdown`, or when the
    // store breaks.
    let (outer, shutdown) = (shutdown.clone(), shutdown.child_token());
    config.validate()?;
    std::fs::create_dir_all(&config.storage).map_err(|source| HubError::Storage {
        path: config.storage.display().to_string(),
        source,
    })?;
    let store = Store::open(&config.storage)?;
    store.limit_disk(config.store.min_free_bytes, config.store.max_disk_bytes);
    let addresses = config.upstream_addresses()?;
    let tls = match &config.upstream.ca_file {
        Some(ca) => {
            let client_cert = config
                .upstream
                .cert_file
                .as_deref()
                .zip(config.upstream.key_file.as_deref());
            Some(upstream::tls_config(ca, client_cert)?)
        }
        None => None,
    };
    let proxy = upstream::Proxy::from_settings(config.upstream.proxy.as_deref(), |name| {
        std::env::var(name).ok()
    })?;
    if let Some(proxy) = &proxy {
        tracing::info!(proxy = %proxy.addr, "upstream connections go through an HTTP proxy");
    }
    let stats = store.stats()?;
    tracing::info!(storage = %config.storage.display(), depth = stats.depth, bytes = stats.bytes, "store opened");

    let metrics = Arc::new(Metrics::default());
    metrics.store_recovered(store.recovery());
    let auth = Arc::new(Auth::open(
        &config.edge_id,
        &config.storage,
        config.auth.clone(),
        metrics.clone(),
    )?);
    let tls_acceptor = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) if config.tls.is_used() => {
            Some(TlsAcceptor::from(tls::server_config(cert, key)?))
        }
        _ => None,
    };
    let tasks = TaskTracker::new();
    let (appender, writer) = store::writer::spawn(
        store.clone(),
        config.store.max_queue_bytes,
        config.store.max_batch,
    );
    let (broker, broker_task) =
        broker::spawn_durable(config.mqtt.broker_limits(), &store, metrics.clone())?;
    let routes = Routes::new(config.route_table()?);
    let plugin_folder = config.plugins.folder(&config.storage);
    std::fs::create_dir_all(&plugin_folder).map_err(|source| HubError::Storage {
        path: plugin_folder.display().to_string(),
        source,
    })?;
    let (default_limits, plugin_settings) = config.plugins.limits_and_settings();
    let registry = Arc::new(Registry::new(
        PluginEngine::new(Some(plugins::engine::cache_dir(&config.storage)))?,
        plugin_settings,
        default_limits,
        config.plugins.max_file_mb.saturating_mul(1 << 20),
        metrics.clone(),
    )?);
    let watcher = plugins::watch::spawn(plugin_folder.clone(), registry.clone(), shutdown.clone())
        .map_err(|source| HubError::Watch {
            path: plugin_folder.display().to_string(),
            source,
        })?;
    let default_ttl_ms = Arc::new(AtomicU64::new(config.store.ttl_secs.saturating_mul(1000)));
    let twins = Arc::new(Twins::open(&store, auth.sealer())?);
    let (hub_twin, reported) = HubTwin::open(
        &config.storage,
        &config.edge_id,
        twins.clone(),
        twin::Baseline {
            routes: config.route_table()?,
            ttl_secs: config.store.ttl_secs,
        },
        routes.clone(),
        default_ttl_ms.clone(),
        registry.clone(),
    )
    .await;
    let (pool, pool_threads) = PluginPool::start(config.plugins.workers, metrics.clone());
    let (inputs, settler) = ModuleInputs::open(
        &store,
        broker.clone(),
        default_ttl_ms.clone(),
        config.store.module_input_bounds(),
        metrics.clone(),
    )?;
    tasks.spawn(settler.run(shutdown.clone()));
    let sinks = Sinks {
        appender: appender.clone(),
        broker: broker.clone(),
        inputs: inputs.clone(),
    };
    let router = Router::new(
        config.mqtt.forward_topics.clone(),
        sinks,
        &config.edge_id,
        routes.clone(),
        Some(PluginHost {
            registry: registry.clone(),
            pool,
        }),
        metrics.clone(),
    )
    .with_max_topic_bytes(config.store.max_topic_bytes);
    let methods = Arc::new(Methods::new(broker.clone()));
    let (c2d, completions) = CloudToDevice::open(
        &store,
        broker.clone(),
        appender.clone(),
        default_ttl_ms.clone(),
        config.store.c2d_bounds(),
        metrics.clone(),
    )?;
    tasks.spawn(completions.run(shutdown.clone()));
    let liveness = Arc::new(Liveness::default());
    tasks.spawn(liveness.clone().run(auth.watch(), shutdown.clone()));
    let ctx = Arc::new(SessionContext {
        auth: auth.clone(),
        router,
        broker: broker.clone(),
        twins: twins.clone(),
        methods: methods.clone(),
        c2d: c2d.clone(),
        inputs,
        metrics: metrics.clone(),
        liveness,
        max_message_bytes: config.mqtt.max_message_bytes,
        session_expiry_secs: config.mqtt.session_expiry_secs,
        next_conn_id: AtomicU64::new(1),
    });

    if let Some(tls) = &tls_acceptor {
        let api = Arc::new(ApiContext {
            auth: auth.clone(),
            methods: methods.clone(),
        });
        for addr in &config.tls.api_listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| HubError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
            tracing::info!(addr = %l.local_addr().unwrap_or(*addr), kind = "HTTPS API", "listener ready");
            tasks.spawn(api::serve(l, tls.clone(), api.clone(), shutdown.clone()));
        }
    }
    let slots = listener::Slots::new(config.mqtt.max_connections);
    let origins = Arc::new(AllowedOrigins::new(&config.mqtt.ws_allowed_origins));
    let layers = |tls: &Option<TlsAcceptor>, websocket: bool| listener::Transport {
        tls: tls.clone(),
        websocket: websocket.then(|| origins.clone()),
    };
    let listeners = [
        (&config.listen, layers(&None, false)),
        (&config.tls.listen, layers(&tls_acceptor, false)),
        (&config.mqtt.ws_listen, layers(&None, true)),
        (&config.tls.ws_listen, layers(&tls_acceptor, true)),
    ];
    for (addrs, transport) in listeners {
        for addr in addrs {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| HubError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
            tracing::info!(addr = %l.local_addr().unwrap_or(*addr), kind = transport.kind(), "listener ready");
            tasks.spawn(listener::run(
                l,
                transport.clone(),
                ctx.clone(),
                slots.clone(),
                shutdown.clone(),
            ));
        }
    }
    if let Some(addr) = config.metrics {
        let l = monitor::bind(addr).await.map_err(|source| HubError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        tracing::info!(%addr, "metrics and status page ready");
        let sources = monitor::Sources {
            metrics: metrics.clone(),
            store: store.clone(),
            broker: broker.clone(),
            routes: routes.clone(),
            plugins: Some(registry.clone()),
            slots: slots.clone(),
        };
        let upstream = addresses.iter().map(ToString::to_string).collect();
        let seen = monitor::Seen::new(sources, config.edge_id.clone(), upstream);
        tasks.spawn(monitor::serve(l, Arc::new(seen), shutdown.clone()));
    }
    let mut link = Link::new(
        LinkConfig {
            addresses,
            login: Login {
                client_id: config.edge_id.clone(),
                username: config.upstream.username.clone(),
                password: config.upstream.password.clone(),
                sas: config
                    .upstream
                    .sas_key
                    .as_ref()
                    .zip(config.upstream.hub_name.as_ref())
                    .map(|(key, hub)| {
                        use base64::Engine;
                        upstream::EdgeSas {
                            hub_name: hub.clone(),
                            key: base64::engine::general_purpose::STANDARD
                                .decode(key)
                                .unwrap_or_default(),
                            ttl_secs: 3600,
                        }
                    }),
                keep_alive: config.upstream.keep_alive_secs,
                clean_session: false,
                version: config.upstream.mqtt_version,
            },
            max_backoff: Duration::from_millis(config.upstream.max_backoff_ms),
            failback: (config.upstream.failback_secs > 0)
                .then(|| Duration::from_secs(config.upstream.failback_secs)),
        },
        Arc::new(Transport { tls, proxy }),
        metrics.clone(),
    );
    let cloud = CloudSync::subscribe(&mut link, &config.edge_id);
    let twin_sync = TwinSync::subscribe(&mut link);
    let method_sync = MethodSync::subscribe(&mut link);
    let c2d_sync = C2dSync::subscribe(&mut link);
    let (link, link_events, link_actor) = link.start();
    tasks.spawn(cloud.run(auth.clone(), hub_twin, shutdown.clone()));
    let twin_sync = twin_sync.run(
        link.clone(),
        auth.clone(),
        twins,
        broker,
        metrics.clone(),
        shutdown.clone(),
    );
    tasks.spawn(twin_sync);
    let method_sync = method_sync.run(
        link.clone(),
        auth.clone(),
        methods,
        metrics.clone(),
        shutdown.clone(),
    );
    tasks.spawn(method_sync);
    tasks.spawn(c2d_sync.run(
        link.clone(),
        auth.clone(),
        c2d,
        metrics.clone(),
        config.mqtt.max_message_bytes,
        shutdown.clone(),
    ));
    tasks.spawn(upstream::sync::report(
        link.clone(),
        twin::reported_topic(&config.edge_id),
        reported,
        shutdown.clone(),
    ));
    let forwarder = Forwarder {
        store: store.clone(),
        metrics: metrics.clone(),
        link,
        events: link_events,
        max_inflight: config.upstream.max_inflight,
        keep_alive: Duration::from_secs(config.upstream.keep_alive_secs.max(1).into()),
        ttl_ms: default_ttl_ms.clone(),
        refusals_before_dead_letter: config.upstream.refusals_before_dead_letter,
        max_bytes_per_sec: config.upstream.max_bytes_per_sec,
        live_share: config.upstream.live_share_percent,
    };
    let forwarder = forwarder
        .spawn(link_actor, shutdown.clone())
        .map_err(HubError::Thread)?;
    tasks.spawn(async move {
        let _ = tokio::task::spawn_blocking(move || forwarder.join()).await;
    });
    match crate::control::bind(&config.storage) {
        Ok(listener) => {
            tasks.spawn(crate::control::serve(
                listener,
                store.clone(),
                appender,
                shutdown.clone(),
            ));
        }
        Err(e) => {
            // The writer ends when the last appender is gone.
            drop(appender);
            tracing::warn!(path = %crate::control::socket_path(&config.storage).display(), error = %e, "no control socket; `edgehub queue dead-letters` needs the hub stopped")
        }
    }
    tasks.spawn(write_status(
        config.storage.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    drop(ctx);

    let stopped = tokio::select! {
        _ = outer.cancelled() => Stopped::Shutdown,
        _ = store.broken() => Stopped::StoreBroken,
    };
    shutdown.cancel();
    tracing::info!(reason = ?stopped, "shutting down");
    tasks.close();
    tasks.wait().await;
    // Sessions are gone: the last router/broker handles drop, so the
    // broker and the store writer finish what they hold and end.
    let _ = broker_task.await;
    let _ = tokio::task::spawn_blocking(move || {
        for t in pool_threads {
            let _ = t.join();
        }
        let _ = watcher.join();
    })
    .await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    match store.sync().and_then(|()| store.stats()) {
        Ok(stats) => {
            let _ = store::status::write(&config.storage, stats);
        }
        // A broken store may refuse this too: opening it again repairs it.
        Err(e) if stopped == Stopped::StoreBroken => {
            tracing::warn!(error = %e, "the broken store was not synced on the way out")
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!("stopped");
    Ok(stopped)
}

/// Keeps `<storage>/queue-stats.json` fresh for `edgehub queue stats`:
/// checks the stats once a second and rewrites the file (an fsync) only when
/// they changed, off the async runtime.
async fn write_status(storage: std::path::PathBuf, store: Store, shutdown: CancellationToken) {
    let mut written = None;
    loop {
        let (storage, store) = (storage.clone(), store.clone());
        let last = written;
        let wrote = tokio::task::spawn_blocking(move || {
            let stats = store.stats().ok()?;
            if Some(stats) == last {
                return Some(stats);
            }
            match store::status::write(&storage, stats) {
                Ok(()) => Some(stats),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the queue status file");
                    None
                }
            }
        })
        .await;
        written = wrote.ok().flatten();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
