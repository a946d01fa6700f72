//! What can go wrong with the upstream connection, named once for every
//! layer of it (transport, proxy, WebSocket, MQTT handshake, the link).

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    // `error`, not `source`: the message already says it, and a source
    // would print it twice in an error chain.
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
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
    #[error("upstream not used: {0}")]
    Unusable(String),
    #[error("upstream handshake timed out")]
    Timeout,
    #[error("upstream closed the connection")]
    Closed,
    #[error("left for the first upstream address, {0}, which is back")]
    FailBack(String),
    #[error("upstream sent a bad packet: {0}")]
    Protocol(String),
    #[error(transparent)]
    Malformed(#[from] super::wire::Malformed),
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
