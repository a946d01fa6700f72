//! The accept loop: one task per connection (after the TLS handshake on a
//! TLS listener), capped (a connection past the cap is refused with a
//! CONNACK, never left waiting), stopped by the shutdown token and awaited
//! before the hub exits.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{self, SessionContext};

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections beyond the limit answered with a refusal at once; past
/// these, a connection is closed without a word.
const REFUSING: usize = 64;

/// Accepts connections on `listener` (TLS ones when `tls` is set), at
/// most as many at once as `limit` has permits (shared by all listeners).
/// A client beyond the limit gets a CONNACK refusal, never a wait.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<SessionContext>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let max = limit.available_permits();
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
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => Admission::Serve(p),
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(p) => Admission::Refuse(p),
                Err(_) => {
                    ctx.metrics.connection_refused();
                    continue; // dropping the socket closes it
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        sessions.spawn(async move {
            let peer = peer.to_string();
            match tls {
                None => {
                    permit
                        .serve(socket, Vec::new(), peer, ctx, max, shutdown)
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|chain| chain.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
                                .unwrap_or_default();
                            permit.serve(stream, cert, peer, ctx, max, shutdown).await
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    sessions.close();
    sessions.wait().await;
}

/// What a new connection gets: a session, or a refusal (each holding its
/// permit until the connection ends).
enum Admission {
    Serve(OwnedSemaphorePermit),
    Refuse(OwnedSemaphorePermit),
}

impl Admission {
    async fn serve<S>(
        self,
        stream: S,
        certs: Vec<Vec<u8>>,
        peer: String,
        ctx: Arc<SessionContext>,
        limit: usize,
        shutdown: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match self {
            Admission::Serve(_permit) => session::serve(stream, certs, peer, ctx, shutdown).await,
            Admission::Refuse(_permit) => session::refuse_busy(stream, peer, limit, ctx).await,
        }
    }
}
