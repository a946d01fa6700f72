//! HTTP CONNECT proxies: which proxy the upstream goes through (the
//! `upstream.proxy` setting, else `https_proxy`, less the hosts `no_proxy`
//! exempts) and the CONNECT exchange that turns a connection to the proxy
//! into a tunnel to the broker.
//!
//! Owns that choice and the CONNECT request and answer. It does not open
//! sockets (the transport does) nor speak TLS, WebSocket or MQTT inside the
//! tunnel.

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::UpstreamError;
use crate::config::{authority, ConfigError, ProxyAddr};

/// Longest CONNECT answer head read from a proxy.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// The proxy the upstream connections go through.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: ProxyAddr,
    /// Host names (and domains) reached directly, lower case; `*`: all.
    no_proxy: Vec<String>,
}

impl Proxy {
    /// The proxy to use: `setting` (`upstream.proxy`; empty means none), else
    /// the conventional `https_proxy` / `HTTPS_PROXY` variables read through
    /// `env`. `no_proxy` / `NO_PROXY` exempt hosts in both cases.
    pub fn from_settings(
        setting: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| env(name).filter(|v| !v.trim().is_empty()))
        };
        let (text, source) = match setting {
            Some(s) if s.trim().is_empty() => return Ok(None),
            Some(s) => (s.to_string(), "upstream.proxy"),
            None => match var(&["https_proxy", "HTTPS_PROXY"]) {
                Some(v) => (v, "https_proxy"),
                None => return Ok(None),
            },
        };
        let addr =
            ProxyAddr::parse(&text).map_err(|e| ConfigError::Value(format!("{source}: {e}")))?;
        let no_proxy = var(&["no_proxy", "NO_PROXY"])
            .map(|list| {
                list.split(',')
                    .map(|h| h.trim())
                    .map(|h| match h {
                        "*" => h,
                        _ => h
                            .trim_start_matches("*.")
                            .trim_start_matches('.')
                            .trim_start_matches('[')
                            .trim_end_matches(']'),
                    })
                    .filter(|h| !h.is_empty())
                    .map(str::to_ascii_lowercase)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Self { addr, no_proxy }))
    }

    /// Whether a connection to `host` goes through this proxy: not when
    /// `no_proxy` names the host, a domain it is in, or `*`.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.no_proxy.iter().any(|exempt| {
            exempt == "*"
                || host == *exempt
                || host
                    .strip_suffix(exempt.as_str())
                    .is_some_and(|sub| sub.ends_with('.'))
        })
    }
}

/// Asks the proxy on `io` for a tunnel to `host:port` and reads its answer.
/// On success `io` carries the tunnel: nothing past the answer was read.
pub async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    proxy: &ProxyAddr,
    host: &str,
    port: u16,
) -> Result<(), UpstreamError> {
    let target = authority(host, port);
    let problem = |problem: String| UpstreamError::ProxyProtocol {
        proxy: proxy.to_string(),
        target: target.clone(),
        problem,
    };
    let request = connect_request(proxy, &target);
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| problem(format!("a broken connection: {e}")))?;
    io.flush()
        .await
        .map_err(|e| problem(format!("a broken connection: {e}")))?;
    // One byte at a time, so the first bytes of the tunnel stay unread.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER_BYTES {
            return Err(problem(format!(
                "an answer longer than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        match io.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(problem("no answer (it closed the connection)".into()))
            }
            Err(e) => return Err(problem(format!("a broken connection: {e}"))),
        }
    }
    let (status, reason) = parse_answer(&head).map_err(problem)?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(UpstreamError::ProxyRefused {
            proxy: proxy.to_string(),
            target,
            status,
            reason,
        })
    }
}

/// The CONNECT request for `target` (`host:port`), with basic
/// authentication when the proxy address has credentials.
fn connect_request(proxy: &ProxyAddr, target: &str) -> String {
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: edgehub/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some((user, password)) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Status code and reason phrase of a complete HTTP answer head.
fn parse_answer(head: &[u8]) -> Result<(u16, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut answer = httparse::Response::new(&mut headers);
    match answer.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("an incomplete HTTP answer".into()),
        Err(e) => {
            let start = String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned();
            return Err(format!("something that is not HTTP ({e}): {start:?}"));
        }
    }
    let status = answer.code.ok_or("an HTTP answer without a status")?;
    Ok((status, answer.reason.unwrap_or("").to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn proxy(text: &str) -> ProxyAddr {
        ProxyAddr::parse(text).unwrap()
    }

    /// Plays the proxy: reads the request head, writes `answer`, and returns
    /// the request.
    async fn answer_with(mut end: DuplexStream, answer: &'static [u8]) -> (String, DuplexStream) {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(end.read_u8().await.unwrap());
        }
        end.write_all(answer).await.unwrap();
        (String::from_utf8(head).unwrap(), end)
    }

    #[tokio::test]
    async fn a_proxy_answering_200_leaves_a_tunnel_with_nothing_of_it_consumed() {
        let (mut hub, far) = tokio::io::duplex(4096);
        let fake = tokio::spawn(answer_with(
            far,
            b"HTTP/1.1 200 Connection established\r\nProxy-agent: test\r\n\r\n\x20\x02\x00\x00",
        ));
        let p = proxy("http://user:pa:ss@127.0.0.1:3128");
        tunnel(&mut hub, &p, "broker.example", 8883).await.unwrap();
        let (request, _far) = fake.await.unwrap();
        assert!(
            request.starts_with("CONNECT broker.example:8883 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nHost: broker.example:8883\r\n"),
            "{request}"
        );
        let token = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        assert!(
            request.contains(&format!("\r\nProxy-Authorization: Basic {token}\r\n")),
            "{request}"
        );
        let mut first = [0u8; 4];
        hub.read_exact(&mut first).await.unwrap();
        assert_eq!(
            first,
            [0x20, 0x02, 0, 0],
            "bytes after the answer belong to the tunnel"
        );
    }

    #[tokio::test]
    async fn a_proxy_without_credentials_gets_no_authorization_header_and_ipv6_targets_in_brackets()
    {
        let (mut hub, far) = tokio::io::duplex(4096);
        let fake = tokio::spawn(answer_with(far, b"HTTP/1.0 200 OK\r\n\r\n"));
        tunnel(&mut hub, &proxy("127.0.0.1:3128"), "::1", 1883)
            .await
            .unwrap();
        let (request, _far) = fake.await.unwrap();
        assert!(
            request.starts_with("CONNECT [::1]:1883 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(!request.contains("Proxy-Authorization"), "{request}");
    }

    #[tokio::test]
    async fn a_proxy_answering_407_is_an_error_naming_the_proxy_and_the_status() {
        let (mut hub, far) = tokio::io::duplex(4096);
        let fake = tokio::spawn(answer_with(
            far,
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
        ));
        let p = proxy("http://user:wrong@127.0.0.1:3128");
        let err = tunnel(&mut hub, &p, "broker", 1883).await.unwrap_err();
        fake.await.unwrap();
        assert!(
            matches!(err, UpstreamError::ProxyRefused { status: 407, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert_eq!(
            text,
            "proxy http://127.0.0.1:3128 refused CONNECT to broker:1883: HTTP 407 Proxy Authentication Required \
             (check the user and password of upstream.proxy / https_proxy)"
        );
        assert!(!text.contains("wrong"), "the password is never shown");
    }

    #[tokio::test]
    async fn a_proxy_answering_garbage_or_nothing_is_a_protocol_error() {
        let (mut hub, far) = tokio::io::duplex(4096);
        let fake = tokio::spawn(answer_with(far, b"SSH-2.0-OpenSSH_9.2\r\n\r\n"));
        let err = tunnel(&mut hub, &proxy("127.0.0.1:22"), "broker", 1883)
            .await
            .unwrap_err();
        fake.await.unwrap();
        assert!(
            matches!(err, UpstreamError::ProxyProtocol { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("not HTTP"), "{err}");

        let (mut hub, mut far) = tokio::io::duplex(4096);
        let fake = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while far.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {}
            drop(far);
        });
        let err = tunnel(&mut hub, &proxy("127.0.0.1:3128"), "broker", 1883)
            .await
            .unwrap_err();
        fake.await.unwrap();
        assert!(err.to_string().contains("no answer"), "{err}");
    }

    #[tokio::test]
    async fn an_endless_answer_head_is_cut_off() {
        let (mut hub, mut far) = tokio::io::duplex(64 * 1024);
        let fake = tokio::spawn(async move {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(far.read_u8().await.unwrap());
            }
            let _ = far.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let _ = far.write_all(&[b'x'; MAX_ANSWER_BYTES]).await;
            far
        });
        let err = tunnel(&mut hub, &proxy("127.0.0.1:3128"), "broker", 1883)
            .await
            .unwrap_err();
        drop(fake);
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn the_setting_wins_over_https_proxy_and_an_empty_setting_means_none() {
        let env = |name: &str| match name {
            "https_proxy" => Some("http://env-proxy:3128".to_string()),
            _ => None,
        };
        let p = Proxy::from_settings(Some("http://set:8080"), env)
            .unwrap()
            .unwrap();
        assert_eq!(p.addr.host, "set");
        let p = Proxy::from_settings(None, env).unwrap().unwrap();
        assert_eq!((p.addr.host.as_str(), p.addr.port), ("env-proxy", 3128));
        assert!(Proxy::from_settings(Some(""), env).unwrap().is_none());
        let upper = |name: &str| (name == "HTTPS_PROXY").then(|| "up:1".to_string());
        assert_eq!(
            Proxy::from_settings(None, upper)
                .unwrap()
                .unwrap()
                .addr
                .host,
            "up"
        );
        assert!(Proxy::from_settings(None, |_| None).unwrap().is_none());
        let bad = |name: &str| (name == "https_proxy").then(|| "ftp://p".to_string());
        let err = Proxy::from_settings(None, bad).unwrap_err().to_string();
        assert!(err.starts_with("https_proxy: "), "{err}");
    }

    #[test]
    fn no_proxy_exempts_exact_hosts_domains_and_everything_with_a_star() {
        let env = |list: &'static str| {
            move |name: &str| match name {
                "https_proxy" => Some("p:3128".to_string()),
                "NO_PROXY" => Some(list.to_string()),
                _ => None,
            }
        };
        let p = Proxy::from_settings(None, env("localhost, .corp.example,10.0.0.7,*.lan"))
            .unwrap()
            .unwrap();
        assert!(!p.applies_to("localhost"));
        assert!(!p.applies_to("LocalHost"));
        assert!(!p.applies_to("broker.corp.example"));
        assert!(!p.applies_to("corp.example"));
        assert!(!p.applies_to("10.0.0.7"));
        assert!(!p.applies_to("gw.lan"));
        assert!(p.applies_to("notcorp.example"));
        assert!(p.applies_to("hub.azure-devices.net"));
        assert!(p.applies_to("10.0.0.70"));
        let all = Proxy::from_settings(None, env("*")).unwrap().unwrap();
        assert!(!all.applies_to("anything"));
    }
}
