//! IoT Hub credentials: the MQTT username form and SAS tokens.
//!
//! Username: `{hub}/{deviceId}/?api-version=…` or
//! `{hub}/{deviceId}/{moduleId}/?api-version=…`. Password:
//! `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64
//! HMAC-SHA256(key, sr + "\n" + se)}&se={unix seconds}[&skn=…]`, where `sr`
//! is signed exactly as sent.

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

/// Longest password looked at; SAS tokens are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// How far past its expiry a device's token is still taken: the device's
/// clock and the gateway's may disagree by this much (see docs/auth.md).
pub const CLOCK_SKEW_SECS: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    pub hub: String,
    pub device_id: String,
    pub module_id: Option<String>,
}

/// Parses an IoT Hub style username; `None` when it is not one.
pub fn parse_username(username: &str) -> Option<Username> {
    let path = username.split('?').next()?.trim_end_matches('/');
    let mut parts = path.split('/');
    let hub = parts.next().filter(|s| !s.is_empty())?;
    let device = parts.next().filter(|s| !s.is_empty())?;
    let module = match parts.next() {
        Some(m) if !m.is_empty() => Some(m.to_string()),
        Some(_) => return None,
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Username {
        hub: hub.to_string(),
        device_id: device.to_string(),
        module_id: module,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` as sent (still URL-encoded): what the signature covers.
    pub sr_raw: String,
    /// `sr` decoded, e.g. `myhub.azure-devices.net/devices/d1`.
    pub resource: String,
    pub signature: Vec<u8>,
    pub expiry: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("password is not a SAS token (no 'SharedAccessSignature ' prefix)")]
    NotSas,
    #[error("SAS token longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("SAS token has no {0}")]
    Missing(&'static str),
    #[error("SAS token field {0} is malformed")]
    Malformed(&'static str),
}

pub fn parse_token(password: &str) -> Result<SasToken, TokenError> {
    if password.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let fields = password
        .strip_prefix("SharedAccessSignature ")
        .ok_or(TokenError::NotSas)?;
    let (mut sr, mut sig, mut se) = (None, None, None);
    for pair in fields.split('&') {
        match pair.split_once('=') {
            Some(("sr", v)) => sr = Some(v),
            Some(("sig", v)) => sig = Some(v),
            Some(("se", v)) => se = Some(v),
            _ => {}
        }
    }
    let sr_raw = sr.ok_or(TokenError::Missing("sr"))?;
    let resource = percent_decode_str(sr_raw)
        .decode_utf8()
        .map_err(|_| TokenError::Malformed("sr"))?
        .into_owned();
    let sig = percent_decode_str(sig.ok_or(TokenError::Missing("sig"))?)
        .decode_utf8()
        .map_err(|_| TokenError::Malformed("sig"))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sig.as_bytes())
        .map_err(|_| TokenError::Malformed("sig"))?;
    let expiry = se
        .ok_or(TokenError::Missing("se"))?
        .parse::<u64>()
        .map_err(|_| TokenError::Malformed("se"))?;
    Ok(SasToken {
        sr_raw: sr_raw.to_string(),
        resource,
        signature,
        expiry,
    })
}

/// The signature a key gives `sr` and `se` (what a device computes).
pub fn sign(key: &[u8], sr_raw: &str, expiry: u64) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{sr_raw}\n{expiry}").as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Whether `token` is signed with `key` (constant-time comparison).
pub fn verify(token: &SasToken, key: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{}\n{}", token.sr_raw, token.expiry).as_bytes());
    mac.verify_slice(&token.signature).is_ok()
}

/// A complete token for `resource` (e.g. `hub/devices/d1`), as the device
/// SDKs make it: URL-encoded but for the unreserved characters (`-._~`), as
/// Python's `quote(s, safe="")` does, so `hub.example` stays as it is.
pub fn make_token(key: &[u8], resource: &str, expiry: u64) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const ENCODED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let sr = utf8_percent_encode(resource, ENCODED).to_string();
    let sig = base64::engine::general_purpose::STANDARD.encode(sign(key, &sr, expiry));
    let sig = utf8_percent_encode(&sig, ENCODED).to_string();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_of_devices_and_modules_parse() {
        assert_eq!(
            parse_username("hub.example/d1/?api-version=2019-10-01&DeviceClientType=x"),
            Some(Username {
                hub: "hub.example".into(),
                device_id: "d1".into(),
                module_id: None
            })
        );
        assert_eq!(
            parse_username("hub.example/edge/m1/?api-version=2021-04-12")
                .unwrap()
                .module_id,
            Some("m1".into())
        );
        for bad in ["", "hub", "hub/", "/d1/?x", "a/b/c/d/?x", "hub//m/?x"] {
            assert_eq!(parse_username(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_token_made_with_a_key_verifies_with_it_and_not_with_another() {
        let token = make_token(b"secret-key", "hub.example/devices/d1", 1_900_000_000);
        let parsed = parse_token(&token).unwrap();
        assert_eq!(parsed.resource, "hub.example/devices/d1");
        assert_eq!(parsed.expiry, 1_900_000_000);
        assert!(verify(&parsed, b"secret-key"));
        assert!(!verify(&parsed, b"other-key"));
    }

    #[test]
    fn malformed_tokens_are_refused_with_the_field_named() {
        assert_eq!(parse_token("Basic abc"), Err(TokenError::NotSas));
        assert_eq!(
            parse_token("SharedAccessSignature sig=a&se=1"),
            Err(TokenError::Missing("sr"))
        );
        assert_eq!(
            parse_token("SharedAccessSignature sr=h%2Fdevices%2Fd&sig=%%%&se=1"),
            Err(TokenError::Malformed("sig"))
        );
        assert_eq!(
            parse_token("SharedAccessSignature sr=h%2Fdevices%2Fd&sig=YWJj&se=soon"),
            Err(TokenError::Malformed("se"))
        );
        assert_eq!(
            parse_token(&"x".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::TooLong)
        );
    }
}
