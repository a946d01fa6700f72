//! The scope cache: the last scope document accepted from the cloud, kept
//! under the storage folder encrypted with the hub's master key
//! (ChaCha20-Poly1305), so offline authentication survives a restart and no
//! key is stored in plain text.
//!
//! Master key: 32 random bytes, base64 in a file (mode 0600). A configured
//! file that is missing, or a key that does not open the cache, is an error;
//! the cache is never silently reset. Without a configured file the hub uses
//! `<storage>.key` beside (not inside) the storage folder, creating it on the
//! first start.

use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

use crate::durable_file;

const CACHE_FILE: &str = "scope.cache";
const MAGIC: &[u8; 8] = b"EHSCOPE1";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("master key file {path} does not exist (it is configured, so it is not created)")]
    KeyMissing { path: PathBuf },
    #[error("master key file {path} is not 32 base64-encoded bytes")]
    KeyInvalid { path: PathBuf },
    #[error("the master key from {path} does not open the scope cache {cache}: wrong key or corrupt cache (it is left as it is)")]
    WrongKey { path: PathBuf, cache: PathBuf },
    #[error("the scope cache {cache} exists but the master key file {path} does not: restore the key (the cache is left as it is)")]
    KeyLost { path: PathBuf, cache: PathBuf },
    // Not a `source`: the message already carries it (shown once).
    #[error("device CA file: {0}")]
    Pem(crate::pem::PemError),
    #[error("scope cache i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ScopeCache {
    path: PathBuf,
    key_path: PathBuf,
    sealer: Sealer,
}

/// Encrypts and decrypts with the master key: the scope cache, and anything
/// else kept secret at rest (device and module twins).
#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl Sealer {
    /// `nonce || ciphertext` of `plain`, with a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .expect("encryption of a bounded document cannot fail");
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// What [`Sealer::seal`] sealed; `None` when the key does not open it
    /// (another key, or damaged bytes).
    pub fn open(&self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < 12 {
            return None;
        }
        let (nonce, sealed) = data.split_at(12);
        self.cipher.decrypt(Nonce::from_slice(nonce), sealed).ok()
    }
}

/// Where the master key lives when none is configured.
pub fn default_key_path(storage: &Path) -> PathBuf {
    let mut p = storage.as_os_str().to_owned();
    p.push(".key");
    PathBuf::from(p)
}

impl ScopeCache {
    /// Loads the master key (creating the default one on a first start) and
    /// checks that it opens an existing cache.
    pub fn open(storage: &Path, configured_key: Option<&Path>) -> Result<Self, CacheError> {
        let path = storage.join(CACHE_FILE);
        let key_path = configured_key
            .map(Path::to_path_buf)
            .unwrap_or_else(|| default_key_path(storage));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CacheError::Io { path: p, source }
        };
        let key = if key_path.exists() {
            let text = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| CacheError::KeyInvalid {
                    path: key_path.clone(),
                })?
        } else if configured_key.is_some() {
            return Err(CacheError::KeyMissing { path: key_path });
        } else if path.exists() {
            return Err(CacheError::KeyLost {
                path: key_path,
                cache: path,
            });
        } else {
            let mut key = vec![0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            durable_file::replace_private(
                &key_path,
                base64::engine::general_purpose::STANDARD
                    .encode(&key)
                    .as_bytes(),
            )
            .map_err(io(&key_path))?;
            tracing::info!(path = %key_path.display(), "created the master key that encrypts the scope cache; keep it with the storage folder");
            key
        };
        let cache = Self {
            path,
            key_path,
            sealer: Sealer {
                cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            },
        };
        cache.load()?;
        Ok(cache)
    }

    /// The cached scope document, if any.
    pub fn load(&self) -> Result<Option<Vec<u8>>, CacheError> {
        let data = match std::fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let wrong = || CacheError::WrongKey {
            path: self.key_path.clone(),
            cache: self.path.clone(),
        };
        match data.strip_prefix(MAGIC.as_slice()) {
            Some(sealed) => self.sealer.open(sealed).map(Some).ok_or_else(wrong),
            None => Err(wrong()),
        }
    }

    /// When the cached document was saved (Unix ms), if there is one.
    pub fn saved_ms(&self) -> Option<u64> {
        let modified = std::fs::metadata(&self.path).ok()?.modified().ok()?;
        let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        u64::try_from(since.as_millis()).ok()
    }

    /// The master key's sealer, for other secrets kept at rest.
    pub fn sealer(&self) -> Sealer {
        self.sealer.clone()
    }

    /// Replaces the cached document, durably (see [`durable_file`]).
    pub fn save(&self, doc: &[u8]) -> Result<(), CacheError> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.sealer.seal(doc));
        durable_file::replace_private(&self.path, &out).map_err(|source| CacheError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_document_reopens_with_the_same_key_and_is_not_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("store");
        std::fs::create_dir_all(&storage).unwrap();
        let cache = ScopeCache::open(&storage, None).unwrap();
        cache.save(b"{\"secret\": \"c2VjcmV0a2V5\"}").unwrap();
        let raw = std::fs::read(storage.join(CACHE_FILE)).unwrap();
        assert!(!raw.windows(8).any(|w| w == b"c2VjcmV0"));
        let again = ScopeCache::open(&storage, None).unwrap();
        let saved = again.saved_ms().expect("a saved cache has a time");
        assert!(saved.abs_diff(crate::clock::wall_ms()) < 60_000, "{saved}");
        assert_eq!(
            again.load().unwrap().unwrap(),
            b"{\"secret\": \"c2VjcmV0a2V5\"}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(default_key_path(&storage))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_wrong_or_lost_key_is_an_error_and_the_cache_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("store");
        std::fs::create_dir_all(&storage).unwrap();
        ScopeCache::open(&storage, None)
            .unwrap()
            .save(b"doc")
            .unwrap();
        let other = dir.path().join("other.key");
        std::fs::write(
            &other,
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        )
        .unwrap();
        assert!(matches!(
            ScopeCache::open(&storage, Some(&other)),
            Err(CacheError::WrongKey { .. })
        ));
        assert!(matches!(
            ScopeCache::open(&storage, Some(&dir.path().join("absent.key"))),
            Err(CacheError::KeyMissing { .. })
        ));
        std::fs::remove_file(default_key_path(&storage)).unwrap();
        assert!(matches!(
            ScopeCache::open(&storage, None),
            Err(CacheError::KeyLost { .. })
        ));
        assert!(storage.join(CACHE_FILE).exists());
    }
}
