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
    Refused(super::wire::Refusal),
    #[error("upstream not used: {0}")]
    Unusable(String),
    #[error("upstream handshake timed out")]
    Timeout,
    #[error("upstream closed the connection")]
    Closed,
    #[error("the upstream disconnected, reason 0x{0:02x}")]
    Disconnected(u8),
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

impl UpstreamError {
    /// Whether the upstream ended the connection itself (it closed or
    /// reset it, or sent a DISCONNECT): what a broker does with a message it
    /// will not take. Not when the hub left: bad bytes from the broker, an
    /// unanswered keepalive, a fail-back, a shutdown.
    pub fn closed_by_upstream(&self) -> bool {
        matches!(
            self,
            UpstreamError::Closed | UpstreamError::Disconnected(_) | UpstreamError::Io(_)
        )
    }
}

/// What a proxy's refusal usually means, for the log line.
fn refusal_hint(status: u16) -> &'static str {
    match status {
        401 | 407 => " (check the user and password of upstream.proxy / https_proxy)",
        403 => " (the proxy does not allow tunnels to this host or port)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_upstream_ending_the_connection_is_its_closing() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(UpstreamError::Closed.closed_by_upstream());
        assert!(UpstreamError::Disconnected(0x99).closed_by_upstream());
        assert!(UpstreamError::Io(io()).closed_by_upstream());
        let malformed = super::super::wire::Malformed("InvalidPacketType(0)".into());
        assert!(!UpstreamError::Malformed(malformed).closed_by_upstream());
        assert!(!UpstreamError::Protocol("QoS 3".into()).closed_by_upstream());
        assert!(!UpstreamError::FailBack("mqtt://a:1883".into()).closed_by_upstream());
        let keepalive = super::super::state::StateError::KeepAlive;
        assert!(!UpstreamError::State(keepalive).closed_by_upstream());
    }
}
