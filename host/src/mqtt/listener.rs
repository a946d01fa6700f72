//! The accept loop: one task per connection, capped (a connection past the
//! cap is refused with a CONNACK, never left waiting), stopped by the
//! shutdown token and awaited before the hub exits. Each listener has a
//! [`Transport`]: TCP, then TLS when it has an acceptor, then a WebSocket
//! when it is a `ws`/`wss` one; the session gets the resulting byte stream,
//! whichever it is.

use crate::websocket::AllowedOrigins;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{self, SessionContext};

/// How long a client may take over its TLS handshake and WebSocket upgrade.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections beyond the limit answered with a refusal at once; past
/// these, a connection is closed without a word.
const REFUSING: usize = 64;

/// The layers between a listener's TCP connections and MQTT.
#[derive(Clone, Default)]
pub struct Transport {
    /// TLS over TCP (the client's certificate, if it sends one, goes to
    /// the session for X.509 authentication).
    pub tls: Option<TlsAcceptor>,
    /// A WebSocket over TCP or TLS (`ws`, `wss`), with the web pages
    /// allowed to open one.
    pub websocket: Option<Arc<AllowedOrigins>>,
}

impl Transport {
    /// What the listener serves, for the log.
    pub fn kind(&self) -> &'static str {
        match (self.tls.is_some(), self.websocket.is_some()) {
            (false, false) => "MQTT",
            (true, false) => "MQTT over TLS",
            (false, true) => "MQTT over WebSocket",
            (true, true) => "MQTT over secure WebSocket",
        }
    }

    /// Opens the layers on a new connection: its byte stream for MQTT and
    /// the certificate chain the client presented (TLS only; else empty).
    async fn open(
        &self,
        socket: TcpStream,
        max_packet: usize,
    ) -> Result<(Box<dyn Stream>, Vec<Vec<u8>>), OpenError> {
        let (stream, certs): (Box<dyn Stream>, _) = match &self.tls {
            None => (Box::new(socket), Vec::new()),
            Some(acceptor) => {
                let stream = acceptor.accept(socket).await.map_err(OpenError::Tls)?;
                let certs = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|chain| chain.iter().map(|c| c.to_vec()).collect())
                    .unwrap_or_default();
                (Box::new(stream), certs)
            }
        };
        let Some(origins) = &self.websocket else {
            return Ok((stream, certs));
        };
        let stream = crate::websocket::accept(stream, max_packet, origins.clone())
            .await
            .map_err(OpenError::WebSocket)?;
        Ok((Box::new(stream), certs))
    }
}

/// A connection's byte stream, whatever carries it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Why a connection did not reach MQTT.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("WebSocket upgrade failed: {0}")]
    WebSocket(tokio_tungstenite::tungstenite::Error),
    #[error("TLS handshake or WebSocket upgrade timed out")]
    TimedOut,
}

/// The hub's `max_connections` slots, shared by every listener. A
/// connection takes one at its TCP accept and holds it until it ends; one
/// accepted while all are held (it gets one of [`REFUSING`] passes) tries
/// again when its CONNECT arrives, and only then is it refused: a client
/// whose TCP connection was queued behind one that was closing is served.
#[derive(Clone)]
pub struct Slots {
    free: Arc<Semaphore>,
    max: usize,
}

impl Slots {
    pub fn new(max: usize) -> Self {
        Self {
            free: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Slots held now: connections served, and connections still opening
    /// (their TLS handshake, WebSocket upgrade or CONNECT to come).
    pub fn held(&self) -> usize {
        self.max - self.free.available_permits()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.free.clone().try_acquire_owned().ok()
    }
}

/// Accepts connections on `listener` through `transport`, at most as many
/// at once as there are `slots` (shared by all listeners). A client beyond
/// the limit gets a CONNACK refusal, never a wait.
pub async fn run(
    listener: TcpListener,
    transport: Transport,
    ctx: Arc<SessionContext>,
    slots: Slots,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    let refusing = Arc::new(Semaphore::new(REFUSING));
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admission = match slots.take() {
            Some(p) => Admission::Serve(p),
            None => match refusing.clone().try_acquire_owned() {
                Ok(p) => Admission::Refuse(p),
                Err(_) => {
                    ctx.metrics.connection_refused();
                    continue; // dropping the socket closes it
                }
            },
        };
        let _ = socket.set_nodelay(true);
        sessions.spawn(connection(
            socket,
            peer,
            admission,
            transport.clone(),
            ctx.clone(),
            slots.clone(),
        ));
    }
    sessions.close();
    sessions.wait().await;
}

/// What a new connection got at its accept: a slot, or a pass to be
/// answered (and a second chance at a slot once its CONNECT arrives); each
/// held until the connection ends.
enum Admission {
    Serve(OwnedSemaphorePermit),
    Refuse(OwnedSemaphorePermit),
}

/// One connection's task. What runs once (the TLS handshake, the WebSocket
/// upgrade, the CONNECT, a refusal) is one boxed future, freed once the
/// session is open: while the client is quiet the task holds little more
/// than its session's wait (10,000 idle clients cost little).
fn connection(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    admission: Admission,
    transport: Transport,
    ctx: Arc<SessionContext>,
    slots: Slots,
) -> impl std::future::Future<Output = ()> + Send {
    let start = Box::pin(async move {
        let peer = peer.to_string();
        let opening = transport.open(socket, ctx.max_message_bytes);
        let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, opening)
            .await
            .unwrap_or(Err(OpenError::TimedOut));
        let (stream, certs) = match opened {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%peer, kind = transport.kind(), error = %e, "connection not opened");
                return None;
            }
        };
        let hello = session::hello(stream, peer, &ctx).await?;
        let permit = match admission {
            Admission::Serve(permit) => permit,
            Admission::Refuse(pass) => match slots.take() {
                Some(permit) => {
                    drop(pass);
                    permit
                }
                None => {
                    hello.refuse_busy(slots.max(), &ctx).await;
                    return None;
                }
            },
        };
        hello.open(certs, ctx).await.map(|live| (live, permit))
    });
    async move {
        if let Some((live, _permit)) = start.await {
            live.serve().await;
        }
    }
}
