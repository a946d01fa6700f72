//! The byte stream under an upstream connection: TCP, optionally through an
//! HTTP CONNECT proxy, optionally TLS, optionally MQTT over WebSocket.
//!
//! Owns opening that stream for one [`UpstreamAddr`] (and the rustls client
//! settings it uses). It does not speak MQTT (`connection.rs` does) and does
//! not retry (the link actor does).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::error::UpstreamError;
use super::proxy::{self, Proxy};
use super::websocket;
use crate::config::UpstreamAddr;

/// An open, bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens the byte stream to one upstream address (TCP, TLS, ...). The link
/// takes one, so tests can hand it in-memory streams.
pub trait Connect: Send + Sync + 'static {
    fn connect<'a>(&'a self, addr: &'a UpstreamAddr) -> Connecting<'a>;
}

/// A transport being opened.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn Io>, UpstreamError>> + Send + 'a>>;

/// TCP, through `proxy` unless the host is exempt, with TLS for `mqtts://`
/// and `wss://` and a WebSocket for `ws://` and `wss://`.
pub struct Transport {
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    pub proxy: Option<Proxy>,
}

impl Connect for Transport {
    fn connect<'a>(&'a self, addr: &'a UpstreamAddr) -> Connecting<'a> {
        Box::pin(async move {
            let proxy = self.proxy.as_ref().filter(|p| p.applies_to(&addr.host));
            let tcp = match proxy {
                Some(p) => TcpStream::connect((p.addr.host.as_str(), p.addr.port))
                    .await
                    .map_err(|error| UpstreamError::Connect {
                        addr: format!("proxy {}", p.addr),
                        error,
                    }),
                None => TcpStream::connect((addr.host.as_str(), addr.port))
                    .await
                    .map_err(|error| UpstreamError::Connect {
                        addr: addr.to_string(),
                        error,
                    }),
            };
            let mut tcp = tcp?;
            tcp.set_nodelay(true)?;
            if let Some(p) = proxy {
                proxy::tunnel(&mut tcp, &p.addr, &addr.host, addr.port).await?;
            }
            let io: Box<dyn Io> = match (addr.tls, &self.tls) {
                (true, Some(config)) => {
                    let name =
                        tokio_rustls::rustls::pki_types::ServerName::try_from(addr.host.clone())
                            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
                    Box::new(tls)
                }
                (true, None) => return Err(UpstreamError::Tls("no CA configured".into())),
                (false, _) => Box::new(tcp),
            };
            match &addr.websocket {
                Some(path) => websocket::open(io, addr, path).await,
                None => Ok(io),
            }
        })
    }
}

/// Builds the rustls client config that trusts the PEM CAs in `ca_file`.
/// `client_cert`: PEM certificate chain and key files for mutual TLS.
pub fn tls_config(
    ca_file: &std::path::Path,
    client_cert: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, UpstreamError> {
    use crate::pem;
    use tokio_rustls::rustls;
    let pem_err = |e: pem::PemError| UpstreamError::Tls(e.to_string());
    let roots = pem::load_roots(ca_file).map_err(pem_err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => config.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = pem::load_certs(cert_file).map_err(pem_err)?;
            let key = pem::load_key(key_file).map_err(pem_err)?;
            config.with_client_auth_cert(chain, key).map_err(|e| {
                UpstreamError::Tls(format!(
                    "{} / {}: {e}",
                    cert_file.display(),
                    key_file.display()
                ))
            })?
        }
    };
    Ok(Arc::new(config))
}
