//! Offline authentication and authorization of downstream clients.
//!
//! Owns the device scope (the identities this hub may authenticate, synced
//! from the cloud and cached encrypted under the storage folder) and the
//! decisions made with it: who a connecting client is ([`Auth::authenticate`]),
//! whether a session is still allowed after a re-sync, and what a client may
//! publish and subscribe to ([`authz`]). It does not talk to the cloud (the
//! upstream sync hands it documents) nor to sockets.
//!
//! Layout: `sas` (usernames, SAS tokens), `scope` (the document and its
//! rules), `cache` (encrypted persistence, master key), `authz` (topic rules).

pub mod authz;
pub mod ca;
pub mod cache;
pub mod sas;
pub mod scope;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;

use crate::metrics::Metrics;
pub use cache::{CacheError, ScopeCache, Sealer};
pub use scope::{Credentials, Scope, ScopeError};

/// A device, or a module of this edge device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl Identity {
    /// `{deviceId}` or `{deviceId}/{moduleId}`: the MQTT client id it uses.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// Plain topics an identity may use besides its own (config `auth.grants`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Grant {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Who a session acts for.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No scope has been synced yet: everything is open, as a plain broker.
    Open,
    /// No credentials, allowed by config: plain topics only.
    Anonymous,
    /// An identity from the scope, with its grants.
    Identity(Identity, Grant),
}

/// What a connecting client presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCredentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// The DER certificate chain of a TLS client (end-entity first; empty
    /// when it sent none).
    pub certificates: &'a [Vec<u8>],
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials present but wrong: CONNACK "bad user name or password".
    BadCredentials(String),
    /// Not allowed at all: CONNACK "not authorized".
    NotAuthorized(String),
}

/// Settings of this module (config section `[auth]`; the flags and
/// environment variables come from these declarations in the `config` module).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "Device authentication ([auth] in the file)")]
pub struct AuthConfig {
    /// A cloud hub host name accepted in usernames and SAS tokens
    /// (repeatable); none accepts any.
    #[arg(
        id = "hub-name",
        long,
        env = "EDGEHUB_HUB_NAMES",
        value_delimiter = ','
    )]
    pub hub_names: Vec<String>,
    /// Let clients without credentials connect once a device scope exists
    /// (plain topics only).
    #[arg(long)]
    pub allow_anonymous: bool,
    /// File with the key that encrypts the scope cache (default:
    /// <storage>.key, created on first start).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
    /// PEM CA certificates that sign devices' certificates (identities of
    /// type x509Ca).
    #[arg(id = "device-ca", long)]
    pub ca_file: Option<PathBuf>,
    /// `grants`: plain topics per client id (`device` or `device/module`).
    #[arg(skip)]
    pub grants: HashMap<String, Grant>,
}

pub struct Auth {
    edge_id: String,
    config: AuthConfig,
    /// Verifies device certificates of CA-signed identities (`auth.ca_file`).
    ca: Option<ca::CaVerifier>,
    cache: ScopeCache,
    scope: watch::Sender<Option<Arc<Scope>>>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Opens the scope cache (see [`cache`]) and loads the last scope.
    pub fn open(
        edge_id: &str,
        storage: &std::path::Path,
        config: AuthConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CacheError> {
        let cache = ScopeCache::open(storage, config.master_key_file.as_deref())?;
        let ca = match &config.ca_file {
            Some(f) => Some(ca::CaVerifier::from_pem_file(f)?),
            None => None,
        };
        let scope = match cache.load()? {
            Some(doc) => match Scope::parse(edge_id, &doc) {
                Ok((scope, _)) => {
                    tracing::info!(
                        identities = scope.identities.len(),
                        version = scope.version,
                        "device scope loaded from the cache"
                    );
                    Some(Arc::new(scope))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cached device scope is unreadable; waiting for a new one from the cloud");
                    None
                }
            },
            None => None,
        };
        metrics.set_scope_identities(scope.as_ref().map_or(0, |s| s.identities.len()));
        if let (Some(s), Some(saved)) = (&scope, cache.saved_ms()) {
            metrics.set_scope_synced(s.version, saved);
        }
        let (scope, _) = watch::channel(scope);
        Ok(Self {
            edge_id: edge_id.to_string(),
            ca,
            config,
            cache,
            scope,
            metrics,
        })
    }

    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    /// Encrypts other secrets at rest with the master key (see [`Sealer`]).
    pub fn sealer(&self) -> Sealer {
        self.cache.sealer()
    }

    /// Changes whenever a new scope is applied.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Scope>>> {
        self.scope.subscribe()
    }

    /// Validates, caches and applies a scope document from the cloud. A
    /// document that does not parse leaves the current scope in place.
    pub fn apply(&self, doc: &[u8]) -> Result<usize, ScopeError> {
        let (scope, rejected) = Scope::parse(&self.edge_id, doc)?;
        for why in &rejected {
            tracing::warn!(reason = %why, "identity left out of the device scope");
        }
        if let Err(e) = self.cache.save(doc) {
            tracing::error!(error = %e, "cannot cache the device scope; it applies until a restart");
        }
        let n = scope.identities.len();
        let version = scope.version;
        // In force first, then said to be: whoever sees the metric or the log
        // line finds the new scope applied to the next CONNECT.
        self.scope.send_replace(Some(Arc::new(scope)));
        self.metrics.set_scope_identities(n);
        self.metrics
            .set_scope_synced(version, crate::clock::wall_ms());
        tracing::info!(
            identities = n,
            rejected = rejected.len(),
            version,
            "device scope applied"
        );
        Ok(n)
    }

    /// Decides who a connecting client is.
    pub fn authenticate(
        &self,
        client_id: &str,
        creds: ClientCredentials<'_>,
    ) -> Result<Principal, Refusal> {
        let result = self.check(client_id, creds);
        if result.is_err() {
            self.metrics.auth_refused(1);
        }
        result
    }

    fn check(&self, client_id: &str, creds: ClientCredentials<'_>) -> Result<Principal, Refusal> {
        let ClientCredentials {
            username,
            password,
            certificates,
        } = creds;
        let certificate = certificates.first().map(Vec::as_slice);
        let scope = self.scope.borrow().clone();
        let Some(scope) = scope else {
            return Ok(Principal::Open);
        };
        let Some(username) = username else {
            return if self.config.allow_anonymous {
                Ok(Principal::Anonymous)
            } else {
                Err(Refusal::NotAuthorized(
                    "no credentials, and anonymous clients are not allowed once a device scope exists".into(),
                ))
            };
        };
        let bad = |m: String| Err(Refusal::BadCredentials(m));
        let Some(user) = sas::parse_username(username) else {
            return bad("username is not {hub}/{deviceId}[/{moduleId}]/?api-version=…".into());
        };
        if !self.config.hub_names.is_empty()
            && !self
                .config
                .hub_names
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&user.hub))
        {
            return Err(Refusal::NotAuthorized(format!(
                "hub name {} is not one this edge serves",
                user.hub
            )));
        }
        let identity = Identity {
            device_id: user.device_id.clone(),
            module_id: user.module_id.clone(),
        };
        let name = identity.client_id();
        if client_id != name {
            return Err(Refusal::NotAuthorized(format!(
                "client id {client_id:?} is not the username's identity {name:?}"
            )));
        }
        let Some((_, credentials)) = scope.get(&name) else {
            return Err(Refusal::NotAuthorized(format!(
                "{name} is not in the device scope"
            )));
        };
        match credentials {
            Credentials::Sas(keys) => {
                let Some(password) = password else {
                    return bad("no SAS token".into());
                };
                let token = match sas::parse_token(password) {
                    Ok(t) => t,
                    Err(e) => return bad(e.to_string()),
                };
                let resource = match &identity.module_id {
                    Some(m) => format!("{}/devices/{}/modules/{m}", user.hub, identity.device_id),
                    None => format!("{}/devices/{}", user.hub, identity.device_id),
                };
                if !token.resource.eq_ignore_ascii_case(&resource) {
                    return bad(format!("token is for {}, not {resource}", token.resource));
                }
                let now = crate::clock::wall_ms() / 1000;
                if token.expiry + sas::CLOCK_SKEW_SECS < now {
                    return bad(format!("token expired {} s ago", now - token.expiry));
                }
                if !keys.iter().any(|k| sas::verify(&token, k)) {
                    return bad("signature does not match the identity's keys".into());
                }
            }
            Credentials::Thumbprints(prints) => {
                let Some(cert) = certificate else {
                    return bad("X.509 identity without a TLS client certificate".into());
                };
                let (sha256, sha1) = thumbprints(cert);
                if !prints.iter().any(|p| *p == sha256 || *p == sha1) {
                    return bad(format!(
                        "client certificate thumbprint {sha1} (SHA-1) / {sha256} (SHA-256) is not the identity's"
                    ));
                }
            }
            Credentials::Ca => {
                let Some(verifier) = &self.ca else {
                    return bad("CA-signed identity, but no auth.ca_file is configured".into());
                };
                let Some((leaf, intermediates)) = certificates.split_first() else {
                    return bad("X.509 identity without a TLS client certificate".into());
                };
                if let Err(e) = verifier.verify(leaf, intermediates) {
                    return bad(format!(
                        "client certificate does not chain to the configured CA: {e}"
                    ));
                }
                let cn = common_name(leaf);
                let expected = [Some(name.as_str()), identity.module_id.as_deref()];
                if !expected.contains(&cn.as_deref()) {
                    return bad(format!("client certificate is for CN {cn:?}, not {name}"));
                }
            }
        }
        let grant = self.config.grants.get(&name).cloned().unwrap_or_default();
        Ok(Principal::Identity(identity, grant))
    }

    /// Whether a session may go on under `scope` (after a re-sync): removed
    /// identities, and open sessions once a scope exists, may not.
    pub fn still_allowed(
        &self,
        principal: &Principal,
        scope: Option<&Scope>,
    ) -> Result<(), String> {
        match (principal, scope) {
            (Principal::Identity(id, _), Some(scope)) if scope.get(&id.client_id()).is_none() => {
                Err(format!(
                    "{} was removed from the device scope",
                    id.client_id()
                ))
            }
            (Principal::Open, Some(_)) if !self.config.allow_anonymous => {
                Err("a device scope now exists and this client has no credentials".into())
            }
            _ => Ok(()),
        }
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// Lower-case hex SHA-256 and SHA-1 digests of a DER certificate.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    use sha1::Digest as _;
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    (
        hex(&sha2::Sha256::digest(der)),
        hex(&sha1::Sha1::digest(der)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// Auth over a storage folder inside `dir`: its default master key
    /// goes beside the storage folder, so inside `dir` too.
    fn auth(dir: &std::path::Path, config: AuthConfig) -> Auth {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        Auth::open("edge", &storage, config, Arc::new(Metrics::default())).unwrap()
    }

    fn scope_doc(key: &[u8]) -> Vec<u8> {
        let k = base64::engine::general_purpose::STANDARD.encode(key);
        format!(r#"{{"version":1,"identities":[
            {{"deviceId":"d1","parent":"edge","auth":{{"type":"sas","primaryKey":"{k}","secondaryKey":"c2Vjb25k"}}}},
            {{"deviceId":"edge","moduleId":"m1","auth":{{"type":"sas","primaryKey":"{k}"}}}}]}}"#)
        .into_bytes()
    }

    fn token(key: &[u8], resource: &str, expiry: u64) -> String {
        sas::make_token(key, resource, expiry)
    }

    const FUTURE: u64 = 4_000_000_000;

    fn login(
        a: &Auth,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Principal, Refusal> {
        a.authenticate(
            client_id,
            ClientCredentials {
                username,
                password,
                certificates: &[],
            },
        )
    }

    #[test]
    fn before_any_scope_every_client_is_let_in_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), AuthConfig::default());
        assert!(matches!(login(&a, "x", None, None), Ok(Principal::Open)));
    }

    #[test]
    fn devices_and_modules_in_scope_authenticate_with_either_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), AuthConfig::default());
        a.apply(&scope_doc(b"primary")).unwrap();
        let user = "hub.example/d1/?api-version=2019-10-01";
        for key in [&b"primary"[..], b"second"] {
            let p = login(
                &a,
                "d1",
                Some(user),
                Some(&token(key, "hub.example/devices/d1", FUTURE)),
            );
            assert!(
                matches!(p, Ok(Principal::Identity(ref id, _)) if id.device_id == "d1"),
                "{p:?}"
            );
        }
        let m = login(
            &a,
            "edge/m1",
            Some("hub.example/edge/m1/?api-version=2021-04-12"),
            Some(&token(
                b"primary",
                "hub.example/devices/edge/modules/m1",
                FUTURE,
            )),
        );
        assert!(matches!(m, Ok(Principal::Identity(..))), "{m:?}");
    }

    #[test]
    fn a_token_expired_within_the_clock_skew_tolerance_is_taken_and_one_beyond_it_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), AuthConfig::default());
        a.apply(&scope_doc(b"primary")).unwrap();
        let user = Some("hub.example/d1/?api-version=2019-10-01");
        let now = crate::clock::wall_ms() / 1000;
        // A device whose clock is behind the hub's signs tokens that look
        // expired to the hub; a minute of margin keeps the test off the edge.
        let within = now + 60 - sas::CLOCK_SKEW_SECS;
        let beyond = now - 60 - sas::CLOCK_SKEW_SECS;
        let within = login(
            &a,
            "d1",
            user,
            Some(&token(b"primary", "hub.example/devices/d1", within)),
        );
        assert!(matches!(within, Ok(Principal::Identity(..))), "{within:?}");
        let beyond = login(
            &a,
            "d1",
            user,
            Some(&token(b"primary", "hub.example/devices/d1", beyond)),
        );
        assert!(
            matches!(beyond, Err(Refusal::BadCredentials(ref why)) if why.contains("expired")),
            "{beyond:?}"
        );
    }

    #[test]
    fn wrong_keys_expired_tokens_other_resources_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(
            dir.path(),
            AuthConfig {
                hub_names: vec!["hub.example".into()],
                ..Default::default()
            },
        );
        a.apply(&scope_doc(b"primary")).unwrap();
        let user = Some("hub.example/d1/?api-version=1");
        let bad = |r: Result<Principal, Refusal>| matches!(r, Err(Refusal::BadCredentials(_)));
        let denied = |r: Result<Principal, Refusal>| matches!(r, Err(Refusal::NotAuthorized(_)));
        assert!(bad(login(
            &a,
            "d1",
            user,
            Some(&token(b"wrong", "hub.example/devices/d1", FUTURE))
        )));
        assert!(bad(login(
            &a,
            "d1",
            user,
            Some(&token(b"primary", "hub.example/devices/d1", 1000))
        )));
        assert!(bad(login(
            &a,
            "d1",
            user,
            Some(&token(b"primary", "hub.example/devices/d2", FUTURE))
        )));
        assert!(bad(login(
            &a,
            "d1",
            user,
            Some("SharedAccessSignature sr=x&sig=!!&se=1")
        )));
        assert!(bad(login(&a, "d1", user, None)));
        assert!(bad(login(&a, "d1", Some("garbage"), Some("x"))));
        assert!(denied(login(
            &a,
            "d2",
            Some("hub.example/d2/?a=1"),
            Some(&token(b"primary", "hub.example/devices/d2", FUTURE))
        )));
        assert!(denied(login(
            &a,
            "someone-else",
            user,
            Some(&token(b"primary", "hub.example/devices/d1", FUTURE))
        )));
        assert!(denied(login(
            &a,
            "d1",
            Some("other.hub/d1/?a=1"),
            Some(&token(b"primary", "other.hub/devices/d1", FUTURE))
        )));
        assert!(denied(login(&a, "anon", None, None)));
    }

    #[test]
    fn an_x509_identity_authenticates_with_the_certificate_whose_thumbprint_is_in_scope() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), AuthConfig::default());
        let cert = b"pretend DER certificate".to_vec();
        let other = [b"another cert".to_vec()];
        let (sha256, sha1) = thumbprints(&cert);
        a.apply(format!(r#"{{"version":1,"identities":[
            {{"deviceId":"cam","parent":"edge","auth":{{"type":"x509Thumbprint","primaryThumbprint":"{}","secondaryThumbprint":"{sha256}"}}}}]}}"#, sha1.to_uppercase()).as_bytes())
            .unwrap();
        let creds = |certificates| ClientCredentials {
            username: Some("h/cam/?api-version=1"),
            password: None,
            certificates,
        };
        assert!(matches!(
            a.authenticate("cam", creds(std::slice::from_ref(&cert))),
            Ok(Principal::Identity(..))
        ));
        assert!(matches!(
            a.authenticate("cam", creds(&other)),
            Err(Refusal::BadCredentials(_))
        ));
        assert!(matches!(
            a.authenticate("cam", creds(&[])),
            Err(Refusal::BadCredentials(_))
        ));
    }

    #[test]
    fn the_scope_survives_a_restart_and_a_bad_document_keeps_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = auth(dir.path(), AuthConfig::default());
            a.apply(&scope_doc(b"primary")).unwrap();
            assert!(a.apply(b"{ not json").is_err());
        }
        let a = auth(dir.path(), AuthConfig::default());
        let p = login(
            &a,
            "d1",
            Some("h/d1/?a=1"),
            Some(&token(b"primary", "h/devices/d1", FUTURE)),
        );
        assert!(matches!(p, Ok(Principal::Identity(..))), "{p:?}");
    }

    #[test]
    fn a_removed_identity_and_open_sessions_are_not_allowed_after_a_resync() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), AuthConfig::default());
        a.apply(br#"{"version":2,"identities":[]}"#).unwrap();
        let scope = a.watch().borrow().clone();
        let d1 = Principal::Identity(
            Identity {
                device_id: "d1".into(),
                module_id: None,
            },
            Grant::default(),
        );
        assert!(a.still_allowed(&d1, scope.as_deref()).is_err());
        assert!(a.still_allowed(&Principal::Open, scope.as_deref()).is_err());
        assert!(a
            .still_allowed(&Principal::Anonymous, scope.as_deref())
            .is_ok());
    }
}
