//! Loading certificates and private keys from PEM files, with errors that
//! name the file and say what is wrong with it.
//!
//! Owns reading and decoding only (through `rustls-pki-types`' PEM parser).
//! Does not build TLS configurations or decide whom to trust: the MQTT TLS
//! listener (`mqtt::tls`), the upstream connection (`upstream::tls_config`)
//! and device CA checks (`auth::ca`) do that with what this returns.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificates in it (expected PEM \"BEGIN CERTIFICATE\" sections)")]
    NoCertificates { path: PathBuf },
    #[error("{path}: no private key in it (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" section)")]
    NoKey { path: PathBuf },
    #[error("{path}: not valid PEM: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{path}: certificate {index} cannot be used as a trust anchor: {message}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        message: String,
    },
}

impl PemError {
    fn from_pem(path: &Path, e: pem::Error, nothing: PemError) -> PemError {
        let path = path.to_path_buf();
        match e {
            pem::Error::Io(source) => PemError::Read { path, source },
            pem::Error::NoItemsFound => nothing,
            other => PemError::Malformed {
                path,
                message: other.to_string(),
            },
        }
    }
}

/// Every certificate in the PEM file at `path`, in file order (a chain:
/// the leaf first). An empty list is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let none = || PemError::NoCertificates {
        path: path.to_path_buf(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PemError::from_pem(path, e, none()))?;
    if certs.is_empty() {
        return Err(none());
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        PemError::from_pem(
            path,
            e,
            PemError::NoKey {
                path: path.to_path_buf(),
            },
        )
    })
}

/// The certificates in the PEM file at `path` as trust anchors (a CA
/// bundle). Every certificate must be usable; none is an error.
pub fn load_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| PemError::BadCertificate {
            path: path.to_path_buf(),
            index: index + 1,
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A self-signed certificate and its key (EC P-256), made for these tests.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBjDCCATOgAwIBAgIUb8xeBc5MEAPtkeOT8+BZfKGYBPUwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZWRnZWh1Yi1wZW0tdGVzdDAgFw0yNjExMjkwMTI0NDJaGA8y
MTI2MTEwNTAxMjQ0MlowGzEZMBcGA1UEAwwQZWRnZWh1Yi1wZW0tdGVzdDBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABKINI43OgkjSea8u/0rnQRnAcZU+5F6VoXwO
Rb7ad99v5Z4WrsVwMi49QG5pf2xyOAS9QuMfk+PPEXskYjnnIySjUzBRMB0GA1Ud
DgQWBBQhnq3zqsqI5giTq6L4rLW6seuOjTAfBgNVHSMEGDAWgBQhnq3zqsqI5giT
q6L4rLW6seuOjTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIEti
CHzzHgT51PD7E+NycSEk8RBQlQunQUgXuwJ6pRglAiAju3vlWJKdPc/OYsxpM3xv
LrSNWTTgkehWn27Un2X2vA==
-----END CERTIFICATE-----
";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgw4U1Hjz+BGH42Zze
ybQoQyvSLx+rvQh730v8plk/CIehRANCAASiDSONzoJI0nmvLv9K50EZwHGVPuRe
laF8DkW+2nffb+WeFq7FcDIuPUBuaX9scjgEvULjH5PjzxF7JGI55yMk
-----END PRIVATE KEY-----
";
    // Valid PEM and base64, but not a certificate.
    const NOT_A_CERT: &str =
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn certificates_come_back_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, "chain.pem", &format!("{CERT}{CERT}"));
        let certs = load_certs(&p).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], certs[1]);
    }

    #[test]
    fn a_key_and_a_trust_anchor_load_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = file(&dir, "key.pem", KEY);
        assert!(matches!(load_key(&key).unwrap(), PrivateKeyDer::Pkcs8(_)));
        let ca = file(&dir, "ca.pem", CERT);
        assert_eq!(load_roots(&ca).unwrap().len(), 1);
    }

    #[test]
    fn a_ca_file_with_a_certificate_that_does_not_parse_says_which_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, "bundle.pem", &format!("{CERT}{NOT_A_CERT}"));
        let e = load_roots(&p).unwrap_err();
        assert!(
            matches!(e, PemError::BadCertificate { index: 2, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("bundle.pem"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, "empty.pem", "just text\n");
        let e = load_certs(&p).unwrap_err();
        assert!(matches!(e, PemError::NoCertificates { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("empty.pem") && msg.contains("no certificates in it"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_without_a_key_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, "cert-only.pem", CERT);
        let msg = load_key(&p).unwrap_err().to_string();
        assert!(
            msg.contains("cert-only.pem") && msg.contains("no private key in it"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_file_is_a_read_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent.pem");
        for e in [load_certs(&p).unwrap_err(), load_key(&p).unwrap_err()] {
            assert!(matches!(e, PemError::Read { .. }), "{e:?}");
            assert!(e.to_string().contains("absent.pem"), "{e}");
        }
    }

    #[test]
    fn a_section_without_its_end_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let cut = &CERT[..CERT.len() - 30];
        let p = file(&dir, "cut.pem", cut);
        let e = load_certs(&p).unwrap_err();
        assert!(matches!(e, PemError::Malformed { .. }), "{e:?}");
        assert!(e.to_string().contains("cut.pem"), "{e}");
    }
}
