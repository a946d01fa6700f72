//! The server side of MQTT over TLS: certificate and key (loaded by
//! [`crate::pem`]), and client certificates.
//!
//! Client certificates are optional and any certificate is accepted at the
//! TLS layer, with its handshake signature verified (the client proves it
//! holds the key). Whether that certificate identifies a device is decided
//! after the handshake by `auth`, against the thumbprints in the scope: X.509
//! device certificates are usually self-signed, so a CA check here would
//! refuse exactly the clients that need them.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

use crate::pem::{self, PemError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // Not a `source`: the message already carries it (shown once).
    #[error("TLS listener: {0}")]
    Pem(PemError),
    #[error("TLS listener: {0}")]
    Config(String),
}

/// A rustls server config for the certificate chain and key in PEM files.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = pem::load_certs(cert_file).map_err(TlsError::Pem)?;
    let key = pem::load_key(key_file).map_err(TlsError::Pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyClientCert {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }))
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} / {}: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// Offers client authentication, accepts any certificate chain, verifies
/// the handshake signatures.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
