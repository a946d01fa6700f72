//! What an operator sees of a running hub: the listener of `--metrics`,
//! serving the Prometheus metrics (`/metrics`), a status page (`/`: one
//! HTML file with its script, no build step and nothing fetched from
//! elsewhere, so it works on a gateway with no Internet) and the JSON the
//! page draws (`/status.json`: the numbers, routes, plugins and sessions,
//! with the last hour of the queue sampled every 10 s by `status`).
//!
//! Owns the tiny HTTP/1.1 responder and the page. Does not count anything
//! (`metrics` does) or hold the queue (`store`).

mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use status::{Seen, Sources, SAMPLE_EVERY, SESSIONS_LISTED};

/// The status page.
const PAGE: &str = include_str!("page.html");

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The longest request head (request line and headers) read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Headers parsed at most (more is a bad request).
const MAX_HEADERS: usize = 32;

/// What the responder answers to a request head.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Metrics,
    Page,
    Status,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
}

/// Reads one request head (bounded in size) and decides the answer;
/// `None` when more bytes are needed.
fn answer_for(head: &[u8]) -> Option<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= MAX_REQUEST_HEAD => Some(Answer::TooLarge),
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Answer::BadRequest),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            let answer = match path {
                "/metrics" => Answer::Metrics,
                "/" | "/index.html" => Answer::Page,
                "/status.json" => Answer::Status,
                _ => return Some(Answer::NotFound),
            };
            Some(if req.method != Some("GET") {
                Answer::MethodNotAllowed
            } else {
                answer
            })
        }
    }
}

/// Answers one connection: one request, one response, then close.
async fn respond(mut sock: TcpStream, seen: Arc<Seen>) {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = sock.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            let room = MAX_REQUEST_HEAD - head.len();
            head.extend_from_slice(&buf[..n.min(room)]);
            if let Some(answer) = answer_for(&head) {
                return Some(answer);
            }
        }
    };
    let Ok(Some(answer)) = tokio::time::timeout(REQUEST_TIMEOUT, read).await else {
        return;
    };
    let (status, content_type, extra, body) = match answer {
        Answer::Metrics => {
            let Ok(body) = tokio::task::spawn_blocking(move || seen.metrics_text()).await else {
                return;
            };
            ("200 OK", CONTENT_TYPE, "", body)
        }
        Answer::Page => ("200 OK", "text/html; charset=utf-8", "", PAGE.to_string()),
        Answer::Status => {
            let sessions = seen.broker.clients(SESSIONS_LISTED).await;
            let status = move || seen.status_json(sessions);
            let Ok(body) = tokio::task::spawn_blocking(status).await else {
                return;
            };
            (
                "200 OK",
                "application/json",
                "Cache-Control: no-store\r\n",
                body,
            )
        }
        Answer::NotFound => (
            "404 Not Found",
            "text/plain",
            "",
            "not found: this server serves /metrics, / and /status.json\n".to_string(),
        ),
        Answer::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "Allow: GET\r\n",
            "method not allowed: use GET\n".to_string(),
        ),
        Answer::BadRequest => (
            "400 Bad Request",
            "text/plain",
            "",
            "bad request\n".to_string(),
        ),
        Answer::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "",
            "request head too large\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// Serves `/metrics`, the status page and its JSON on `listener` until
/// `shutdown`, sampling the history every [`SAMPLE_EVERY`].
pub async fn serve(listener: TcpListener, seen: Arc<Seen>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let seen = seen.clone();
                let _ = tokio::task::spawn_blocking(move || seen.sample()).await;
                continue;
            }
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        tokio::spawn(respond(sock, seen.clone()));
    }
}

/// Binds the monitor's address (so a bad address fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::Store;

    #[test]
    fn only_get_of_the_three_paths_is_answered() {
        let a = |req: &str| answer_for(req.as_bytes());
        assert_eq!(
            a("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(
            a("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(a("GET / HTTP/1.1\r\n\r\n"), Some(Answer::Page));
        assert_eq!(
            a("GET /status.json?t=1 HTTP/1.1\r\n\r\n"),
            Some(Answer::Status)
        );
        assert_eq!(
            a("DELETE /status.json HTTP/1.1\r\n\r\n"),
            Some(Answer::MethodNotAllowed)
        );
        assert_eq!(a("GET /x HTTP/1.1\r\n\r\n"), Some(Answer::NotFound));
        assert_eq!(a("GET /metricsx HTTP/1.1\r\n\r\n"), Some(Answer::NotFound));
        assert_eq!(
            a("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Answer::MethodNotAllowed)
        );
        assert_eq!(
            a("GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            None,
            "head not finished yet"
        );
        assert_eq!(a("GET /met"), None);
        assert_eq!(a("\x00\x01 nonsense\r\n\r\n"), Some(Answer::BadRequest));
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX: {}",
            "a".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(
            answer_for(&long.as_bytes()[..MAX_REQUEST_HEAD]),
            Some(Answer::TooLarge)
        );
    }

    async fn http(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_listener_serves_metrics_the_page_and_its_json_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.received(3);
        let (broker, _) = crate::broker::spawn(16, metrics.clone());
        let sources = Sources {
            metrics,
            store,
            broker,
            routes: Default::default(),
            plugins: None,
            slots: crate::mqtt::listener::Slots::new(4),
        };
        let seen = Arc::new(Seen::new(sources, "edge1".into(), vec![]));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, seen, shutdown.clone()));

        let ok = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(ok.contains("\nedgehub_messages_received_total 3\n"), "{ok}");
        let page = http(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(
            page.contains("text/html") && page.contains("/status.json"),
            "{page}"
        );
        let status = http(addr, "GET /status.json HTTP/1.1\r\n\r\n").await;
        let body = status.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["edgeId"], "edge1");
        assert_eq!(v["now"]["received"], 3);
        let missing = http(addr, "GET /favicon.ico HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET\r\n"), "{post}");
        let bad = http(addr, "hello\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");

        shutdown.cancel();
        server.await.unwrap();
    }
}
