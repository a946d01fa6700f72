//! The server side of TLS, shared by the MQTT, secure WebSocket and HTTPS
//! API listeners: certificate and key (loaded by [`crate::pem`], read again
//! when their files change), and client certificates.
//!
//! Certificate renewal without a restart: on a handshake, at most once a
//! second, the two files' metadata (size, modification and change times,
//! inode) are compared with what was last read; when they differ the pair is
//! read again and, if the key matches the certificate, served to new
//! connections (live ones keep the session they have). A pair that cannot be
//! used (bad PEM, a key that is not the certificate's, a file missing) is
//! logged once and the previous certificate is kept. Checking on the
//! handshake rather than watching the files needs no thread and no inotify
//! watch, and sees every way a file is replaced (written in place, renamed
//! over, a symbolic link switched as Kubernetes secret volumes and certbot's
//! `live/` folder do), at the cost of two `stat` calls a second at most.
//!
//! Client certificates are optional and any certificate is accepted at the
//! TLS layer, with its handshake signature verified (the client proves it
//! holds the key). Whether that certificate identifies a device is decided
//! after the handshake by `auth`, against the thumbprints in the scope: X.509
//! device certificates are usually self-signed, so a CA check here would
//! refuse exactly the clients that need them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::pem::{self, PemError};

/// How often, at most, a handshake looks at the certificate files.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // Not a `source`: the message already carries it (shown once).
    #[error("TLS listener: {0}")]
    Pem(PemError),
    #[error("TLS listener: {0}")]
    Config(String),
}

/// A rustls server config for the certificate chain and key in PEM files,
/// read again when they change (see the module's documentation).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = ReloadingCert::load(cert_file, key_file, provider.clone(), CHECK_INTERVAL)?;
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyClientCert {
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_cert_resolver(Arc::new(certificate));
    Ok(Arc::new(config))
}

/// The listeners' certificate and key, read again from their files when
/// they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    interval: Duration,
    /// What new handshakes are given.
    current: ArcSwap<CertifiedKey>,
    /// When the files were last looked at, and what they were like when
    /// last read (whether or not that pair could be used): a change from it
    /// is what makes the pair be read again.
    seen: Mutex<(Instant, Stamp)>,
}

impl ReloadingCert {
    /// Reads the pair (an unusable one is an error here: the hub does not
    /// start without a certificate).
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
        interval: Duration,
    ) -> Result<Self, TlsError> {
        let stamp = Stamp::of(cert_file, key_file);
        let current = read_pair(cert_file, key_file, &provider)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            interval,
            current: ArcSwap::from_pointee(current),
            seen: Mutex::new((Instant::now(), stamp)),
        })
    }

    /// The certificate to serve now, after reading the files again if they
    /// changed and the last look is `interval` old.
    fn current(&self) -> Arc<CertifiedKey> {
        // A handshake that finds another one looking does not wait for it.
        if let Ok(mut seen) = self.seen.try_lock() {
            if seen.0.elapsed() >= self.interval {
                seen.0 = Instant::now();
                let stamp = Stamp::of(&self.cert_file, &self.key_file);
                if stamp != seen.1 {
                    seen.1 = stamp;
                    self.reload();
                }
            }
        }
        self.current.load_full()
    }

    fn reload(&self) {
        let (cert, key) = (self.cert_file.display(), self.key_file.display());
        match read_pair(&self.cert_file, &self.key_file, &self.provider) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                tracing::info!(%cert, %key, "TLS certificate reloaded: new connections get it");
            }
            Err(e) => tracing::warn!(
                %cert,
                %key,
                error = %e,
                "the TLS certificate files changed but cannot be used; the previous certificate is still served"
            ),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The chain and key in the files, the key checked against the chain's
/// first certificate.
fn read_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = pem::load_certs(cert_file).map_err(TlsError::Pem)?;
    let key = pem::load_key(key_file).map_err(TlsError::Pem)?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        TlsError::Config(format!(
            "{} / {}: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })
}

/// What the certificate and key files look like from outside: one that is
/// written, renamed over or reached through a switched link looks different.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp([Option<FileStamp>; 2]);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Device, inode and change time (which no one can set back).
    #[cfg(unix)]
    unix: (u64, u64, i64, i64),
}

impl Stamp {
    fn of(cert_file: &Path, key_file: &Path) -> Self {
        let file = |path: &Path| {
            // `metadata` follows symbolic links: a switched link is seen.
            let m = std::fs::metadata(path).ok()?;
            Some(FileStamp {
                len: m.len(),
                modified: m.modified().ok(),
                #[cfg(unix)]
                unix: {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
                },
            })
        };
        Stamp([file(cert_file), file(key_file)])
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    // Two self-signed certificates and their keys (EC P-256), made for these
    // tests.
    const CERT_A: &str = "-----BEGIN CERTIFICATE-----
MIIBjDCCATOgAwIBAgIUc5nGXO/42o94w69MO3YWPwvqcPgwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZWRnZWh1Yi1yZWxvYWQtYTAgFw0yNjExMjkxMTI3MjZaGA8y
MTI2MTEwNTExMjcyNlowGzEZMBcGA1UEAwwQZWRnZWh1Yi1yZWxvYWQtYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABFuIAZQDQrex3FQQaThYXMch62VmFOvZYyJK
lZFaiSzo+YbRoKASseMG4cN8ARwtFUlQQW7kx+roTW5saT1/H8ujUzBRMB0GA1Ud
DgQWBBQ2a/btN2tolzVl2ZJDpSSsD+kR+jAfBgNVHSMEGDAWgBQ2a/btN2tolzVl
2ZJDpSSsD+kR+jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIHId
C6YUZaaWn+SniEReiQt0LI4E4lqAT3mVwSiSKIG5AiAXyC4Mp4CPk3gKURLQmOs7
N9gXt8v12hMJGmogXH/zog==
-----END CERTIFICATE-----
";
    const KEY_A: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgX/YPdhnuI4Is4brv
RSOpgy99ea2m4qk0qvmD1SPUUqWhRANCAARbiAGUA0K3sdxUEGk4WFzHIetlZhTr
2WMiSpWRWoks6PmG0aCgErHjBuHDfAEcLRVJUEFu5Mfq6E1ubGk9fx/L
-----END PRIVATE KEY-----
";
    const CERT_B: &str = "-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUKbh4TB4sRRlQqRm+Y8uu0x3HWQMwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZWRnZWh1Yi1yZWxvYWQtYjAgFw0yNjExMjkxMTI3MjZaGA8y
MTI2MTEwNTExMjcyNlowGzEZMBcGA1UEAwwQZWRnZWh1Yi1yZWxvYWQtYjBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABGhHWCtvBgc8bdX0znc0lspvMy6Yluh9SHvY
92ZvT1yIkboLS5/bPM02o4bxgARgSoi6QUFMDTuE3fPyrTP1yrOjUzBRMB0GA1Ud
DgQWBBRA8vwACEfnh6cWI8Y89ic6Vz+I8jAfBgNVHSMEGDAWgBRA8vwACEfnh6cW
I8Y89ic6Vz+I8jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIBcA
BdKL6kQdcP14e8lzhKuxKScyKRX4xIQMsw7fH5HKAiEAt41LzbkgsWwdu9kxOPYi
+dhaIDVwIFLRPstxtH9zh/8=
-----END CERTIFICATE-----
";
    const KEY_B: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJ/i49Lxsd2f5/XGa
Jsx+0+BLyHD0Tk+SS/L3c5ui35+hRANCAARoR1grbwYHPG3V9M53NJbKbzMumJbo
fUh72Pdmb09ciJG6C0uf2zzNNqOG8YAEYEqIukFBTA07hN3z8q0z9cqz
-----END PRIVATE KEY-----
";

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(cert: &str, key: &str) -> Self {
            let files = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            files.write(cert, key);
            files
        }
        fn cert(&self) -> PathBuf {
            self.dir.path().join("server.pem")
        }
        fn key(&self) -> PathBuf {
            self.dir.path().join("server.key")
        }
        /// Replaces both files as a renewal tool does: written aside, then
        /// renamed over.
        fn write(&self, cert: &str, key: &str) {
            for (path, text) in [(self.cert(), cert), (self.key(), key)] {
                let aside = path.with_extension("new");
                std::fs::write(&aside, text).unwrap();
                std::fs::rename(&aside, &path).unwrap();
            }
        }
        fn reloading(&self, interval: Duration) -> ReloadingCert {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            ReloadingCert::load(&self.cert(), &self.key(), provider, interval).unwrap()
        }
    }

    fn served(c: &ReloadingCert) -> Vec<u8> {
        c.current().cert[0].to_vec()
    }

    fn der(pem_text: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem_text.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_renewed_pair_is_served_once_the_files_change() {
        let files = Files::new(CERT_A, KEY_A);
        let c = files.reloading(Duration::ZERO);
        assert_eq!(served(&c), der(CERT_A));
        files.write(CERT_B, KEY_B);
        assert_eq!(served(&c), der(CERT_B));
    }

    #[test]
    fn a_broken_replacement_keeps_the_previous_pair_until_a_good_one_arrives() {
        let files = Files::new(CERT_A, KEY_A);
        let c = files.reloading(Duration::ZERO);
        // The new certificate with the old key: they do not match.
        files.write(CERT_B, KEY_A);
        assert_eq!(served(&c), der(CERT_A));
        // Not PEM at all, then missing.
        files.write("not a certificate\n", KEY_B);
        assert_eq!(served(&c), der(CERT_A));
        std::fs::remove_file(files.cert()).unwrap();
        assert_eq!(served(&c), der(CERT_A));
        files.write(CERT_B, KEY_B);
        assert_eq!(served(&c), der(CERT_B));
    }

    #[test]
    fn a_switched_symbolic_link_is_a_change() {
        let files = Files::new(CERT_A, KEY_A);
        let dir = files.dir.path();
        for (name, cert, key) in [("a", CERT_A, KEY_A), ("b", CERT_B, KEY_B)] {
            std::fs::create_dir(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join(name).join("key.pem"), key).unwrap();
        }
        std::os::unix::fs::symlink("a", dir.join("live")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let c = ReloadingCert::load(
            &dir.join("live/cert.pem"),
            &dir.join("live/key.pem"),
            provider,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(served(&c), der(CERT_A));
        // As Kubernetes updates a secret volume: a new link renamed over.
        std::os::unix::fs::symlink("b", dir.join("live.new")).unwrap();
        std::fs::rename(dir.join("live.new"), dir.join("live")).unwrap();
        assert_eq!(served(&c), der(CERT_B));
    }

    #[test]
    fn the_files_are_looked_at_no_more_often_than_the_interval() {
        let files = Files::new(CERT_A, KEY_A);
        let c = files.reloading(Duration::from_secs(3600));
        files.write(CERT_B, KEY_B);
        assert_eq!(served(&c), der(CERT_A));
    }

    #[test]
    fn a_pair_that_does_not_match_at_start_is_an_error_naming_both_files() {
        let files = Files::new(CERT_B, KEY_A);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let e = ReloadingCert::load(&files.cert(), &files.key(), provider, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.pem") && e.contains("server.key"), "{e}");
    }
}
