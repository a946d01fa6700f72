//! The accept loop: one task per connection (after the TLS handshake on a
//! TLS listener), capped, stopped by the shutdown token and awaited before
//! the hub exits.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{self, SessionContext};

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections on `listener` (TLS ones when `tls` is set), at
/// most as many at once as `limit` has permits (shared by all listeners).
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<SessionContext>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
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
        let _ = socket.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        sessions.spawn(async move {
            let peer = peer.to_string();
            match tls {
                None => session::serve(socket, Vec::new(), peer, ctx, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|chain| chain.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
                                .unwrap_or_default();
                            session::serve(stream, cert, peer, ctx, shutdown).await
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    sessions.close();
    sessions.wait().await;
}
