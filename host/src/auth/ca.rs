//! Verifying device certificates against the configured CA (identities of
//! type `x509Ca`), with rustls's WebPKI client verifier.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls;

use super::CacheError;

pub struct CaVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl CaVerifier {
    pub fn from_pem_file(path: &Path) -> Result<Self, CacheError> {
        let bad = |e: String| CacheError::Io {
            path: PathBuf::from(path),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        };
        let roots = crate::pem::load_roots(path).map_err(CacheError::Pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Checks that `leaf` chains (through `intermediates`) to a configured
    /// CA, is valid now and is meant for client authentication.
    pub fn verify(&self, leaf: &[u8], intermediates: &[Vec<u8>]) -> Result<(), rustls::Error> {
        let leaf = CertificateDer::from(leaf);
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        self.inner
            .verify_client_cert(&leaf, &intermediates, UnixTime::now())
            .map(|_| ())
    }
}
