//! MQTT over WebSocket (RFC 6455, subprotocol `mqtt`): the server side of
//! the upgrade, for the hub's `ws` and `wss` listeners, and the adapter that
//! turns a WebSocket back into a byte stream (each write becomes a binary
//! message, binary messages are read back as bytes), for those listeners and
//! for the upstream connection (`upstream::websocket` does the client side of
//! the upgrade).
//!
//! Owns the WebSocket layer only, through tokio-tungstenite (the adapter is
//! tokio-util's `StreamReader` and `SinkWriter`). It does not open the TCP or
//! TLS stream under it, nor frame MQTT packets: a session reads the byte
//! stream as it reads a TCP one, whatever the WebSocket message boundaries.
//!
//! A server accepts any request path (paho asks for `/mqtt`, the Azure IoT
//! device SDKs for `/$iothub/websocket`) and answers with the `mqtt`
//! subprotocol; a client that offers subprotocols without `mqtt` is refused
//! with 400, one that offers none is served. A request from a web page (it
//! carries an `Origin` header) is refused with 403 unless its origin is
//! allowed ([`AllowedOrigins`]): otherwise any page a browser on the plant
//! network opens could talk MQTT to the hub with that browser.

use bytes::Bytes;
use futures_util::future::ready;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

/// The WebSocket subprotocol of MQTT 3.1.1 and 5.
pub const SUBPROTOCOL: &str = "mqtt";

/// What a listener's WebSocket reads at once; a larger message grows the
/// buffer (tungstenite's default, 128 KiB, is allocated up front for every
/// connection).
const READ_BUFFER: usize = 4 * 1024;
/// Bytes written before tungstenite writes to the stream on its own (a
/// flush, which every session write ends with, writes at once).
const WRITE_BUFFER: usize = 8 * 1024;
/// Room in one WebSocket message beyond the largest MQTT packet: a client
/// may send several packets, or a packet and the start of the next, in one.
const MESSAGE_SLACK: usize = 64 * 1024;
/// The most bytes one write sends as one WebSocket message (MQTT over
/// WebSocket does not align packets with messages): the rest of a larger
/// write goes in the next.
const MESSAGE_OUT: usize = 64 * 1024;
/// The most bytes waiting to be written to a peer that does not read: a
/// message and the write buffer with room to spare. Without it, each ping
/// from a peer that never reads its pongs left one more pong queued, for
/// ever (a million pings: 120 MiB); with it, only the latest pong waits,
/// and a message that finds no room ends the connection.
const MAX_WRITE_BUFFER: usize = 4 * MESSAGE_OUT;

/// The WebSocket settings of both sides, reading messages of at most
/// `max_message` bytes (tungstenite's default when `None`).
pub fn config(max_message: Option<usize>) -> WebSocketConfig {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER);
    match max_message {
        Some(max) => config.max_message_size(Some(max)).max_frame_size(Some(max)),
        None => config,
    }
}

/// The web pages allowed to open a WebSocket to the hub, by origin
/// (`scheme://host[:port]`, compared without regard to case); `*` allows
/// any. A request without an `Origin` header, or whose origin is the hub's
/// own address as the request names it (`Host`), is not a page of another
/// site (paho and the SDKs built on it send the latter) and is always
/// allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    any: bool,
    origins: Vec<String>,
}

impl AllowedOrigins {
    pub fn new(origins: &[String]) -> Self {
        let norm = |o: &String| o.trim().trim_end_matches('/').to_ascii_lowercase();
        AllowedOrigins {
            any: origins.iter().any(|o| o.trim() == "*"),
            origins: origins.iter().map(norm).collect(),
        }
    }

    /// Whether a request with this `Origin` header (if any) and this `Host`
    /// header is served.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin.map(str::trim) else {
            return true;
        };
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let same_site = authority
            .zip(host)
            .is_some_and(|(a, h)| a.eq_ignore_ascii_case(h.trim()));
        same_site || self.any || self.origins.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }
}

/// Completes the server side of the upgrade on `io` (a fresh TCP or TLS
/// stream), and returns the connection as a byte stream. A message larger
/// than `max_packet` (plus some slack) ends the connection.
pub async fn accept<S>(
    io: S,
    max_packet: usize,
    origins: std::sync::Arc<AllowedOrigins>,
) -> Result<impl AsyncRead + AsyncWrite + Unpin + Send, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = config(Some(max_packet.saturating_add(MESSAGE_SLACK)));
    #[allow(clippy::result_large_err)] // tungstenite's callback type
    let answer = move |request: &Request, response| upgrade(request, response, &origins);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(io, answer, Some(config)).await?;
    Ok(byte_stream(ws))
}

/// Refuses a page whose origin is not allowed (403), then chooses the
/// subprotocol.
#[allow(clippy::result_large_err)] // tungstenite's callback type
fn upgrade(
    request: &Request,
    response: Response,
    origins: &AllowedOrigins,
) -> Result<Response, ErrorResponse> {
    let text = |name| {
        let value = request.headers().get(name);
        value.map(|v: &HeaderValue| v.to_str().unwrap_or("?"))
    };
    let origin = text(header::ORIGIN);
    if !origins.allows(origin, text(header::HOST)) {
        let origin = origin.unwrap_or_default();
        tracing::warn!(
            origin,
            "WebSocket upgrade refused: a page of another site whose origin is not in mqtt.ws_allowed_origins"
        );
        let mut refusal = ErrorResponse::new(Some(format!(
            "the origin {origin} may not open MQTT connections here (mqtt.ws_allowed_origins)\n"
        )));
        *refusal.status_mut() = StatusCode::FORBIDDEN;
        return Err(refusal);
    }
    choose_subprotocol(request, response)
}

/// Answers the upgrade with the `mqtt` subprotocol when the client offers
/// it, without one when it offers none, and refuses it otherwise.
#[allow(clippy::result_large_err)] // tungstenite's callback type
fn choose_subprotocol(
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    let mut offered = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(response);
    }
    if offered.any(|p| p.eq_ignore_ascii_case(SUBPROTOCOL)) {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        return Ok(response);
    }
    let mut refusal = ErrorResponse::new(Some(format!(
        "MQTT over WebSocket needs the subprotocol {SUBPROTOCOL:?}\n"
    )));
    *refusal.status_mut() = StatusCode::BAD_REQUEST;
    Err(refusal)
}

/// The WebSocket as a byte stream: each write goes out as a binary message,
/// binary messages are read back as bytes. Pings are answered by
/// tungstenite; a close ends the stream; a text message is an error (MQTT
/// over WebSocket uses binary messages only).
pub fn byte_stream<S>(ws: WebSocketStream<S>) -> impl AsyncRead + AsyncWrite + Unpin + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let reader = StreamReader::new(stream.filter_map(|message| {
        ready(match message {
            Ok(Message::Binary(bytes)) => Some(Ok(bytes)),
            Ok(Message::Text(_)) => Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a text message (MQTT over WebSocket uses binary messages)",
            ))),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => None,
            Err(e) => Some(Err(std::io::Error::other(e))),
        })
    }));
    let writer = SinkWriter::new(CopyToBytes::new(
        sink.with(|bytes: Bytes| ready(Ok::<_, WsError>(Message::Binary(bytes)))),
    ));
    Box::pin(tokio::io::join(reader, Chunks(writer)))
}

/// A WebSocket error as the byte stream's I/O error, each time one comes
/// (futures' `sink_map_err` maps the first only, and panics on the next:
/// a session's goodbye after a failed write used to).
#[derive(Debug)]
struct WsError(tungstenite::Error);

impl From<tungstenite::Error> for WsError {
    fn from(e: tungstenite::Error) -> Self {
        WsError(e)
    }
}

impl From<WsError> for std::io::Error {
    fn from(e: WsError) -> Self {
        match e.0 {
            tungstenite::Error::Io(e) => e,
            other => std::io::Error::other(other),
        }
    }
}

/// Writes at most [`MESSAGE_OUT`] bytes at a time, so one write is one
/// WebSocket message of bounded size whatever the session had to send.
struct Chunks<W>(W);

impl<W: AsyncWrite + Unpin> AsyncWrite for Chunks<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(MESSAGE_OUT);
        std::pin::Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// A client upgrade request for `path`, offering `protocols` (if any).
    fn request(path: &str, protocols: Option<&'static str>) -> Request {
        let mut r = format!("ws://hub.example{path}")
            .into_client_request()
            .unwrap();
        if let Some(p) = protocols {
            r.headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        r
    }

    /// Starts a server on one end of an in-memory pipe; returns the other.
    fn server(max_packet: usize) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Vec<u8>>) {
        server_for(max_packet, &["https://dash.example".to_string()])
    }

    /// As [`server`], allowing the pages of `origins`.
    fn server_for(
        max_packet: usize,
        origins: &[String],
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Vec<u8>>) {
        let (near, far) = tokio::io::duplex(256 * 1024);
        let origins = std::sync::Arc::new(AllowedOrigins::new(origins));
        let task = tokio::spawn(async move {
            let mut io = match accept(far, max_packet, origins).await {
                Ok(io) => io,
                Err(_) => return Vec::new(),
            };
            // Echoes what it reads, then returns all of it once the client
            // closes.
            let mut all = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        all.extend_from_slice(&buf[..n]);
                        io.write_all(&buf[..n]).await.unwrap();
                        io.flush().await.unwrap();
                    }
                }
            }
            all
        });
        (near, task)
    }

    #[tokio::test]
    async fn bytes_cross_in_binary_messages_whatever_their_boundaries() {
        let (near, task) = server(1024);
        let (mut ws, response) =
            tokio_tungstenite::client_async(request("/$iothub/websocket", Some("mqtt")), near)
                .await
                .unwrap();
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_PROTOCOL], "mqtt");
        // One MQTT CONNECT split over two messages, a PINGREQ and a
        // DISCONNECT in a third.
        for part in [&b"\x10\x02"[..], b"\x00\x04", b"\xc0\x00\xe0\x00"] {
            ws.send(Message::Binary(Bytes::from(part))).await.unwrap();
        }
        let mut echoed = Vec::new();
        while echoed.len() < 8 {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => echoed.extend_from_slice(&b),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
        assert_eq!(echoed, b"\x10\x02\x00\x04\xc0\x00\xe0\x00");
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        assert_eq!(task.await.unwrap(), b"\x10\x02\x00\x04\xc0\x00\xe0\x00");
    }

    #[tokio::test]
    async fn the_mqtt_subprotocol_is_chosen_from_a_list_and_none_is_also_served() {
        for (offered, answered) in [(Some("mqttv3.1, mqtt"), Some("mqtt")), (None, None)] {
            let (near, task) = server(1024);
            let (mut ws, response) =
                tokio_tungstenite::client_async(request("/mqtt", offered), near)
                    .await
                    .unwrap();
            let got = response
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(got.as_deref(), answered, "offered {offered:?}");
            ws.close(None).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_client_offering_only_other_subprotocols_is_refused_with_400() {
        let (near, task) = server(1024);
        let err = tokio_tungstenite::client_async(request("/mqtt", Some("wamp")), near)
            .await
            .unwrap_err();
        match err {
            tungstenite::Error::Http(response) => {
                assert_eq!(response.status(), StatusCode::BAD_REQUEST)
            }
            other => panic!("expected an HTTP refusal, got {other}"),
        }
        assert!(task.await.unwrap().is_empty());
    }

    #[test]
    fn only_listed_origins_are_allowed_and_a_request_without_one_or_from_the_hub_itself_always_is()
    {
        let listed = AllowedOrigins::new(&[
            "https://Dash.example/".into(),
            "http://10.0.0.5:8080".into(),
        ]);
        let host = Some("gw.plant:8080");
        assert!(listed.allows(None, host));
        assert!(listed.allows(Some("https://dash.example"), host));
        assert!(listed.allows(Some("http://10.0.0.5:8080"), host));
        assert!(!listed.allows(Some("http://10.0.0.5"), host));
        assert!(!listed.allows(Some("https://dash.example.evil.test"), host));
        assert!(!listed.allows(Some("null"), host));
        // what paho sends: its own idea of the hub's address
        assert!(listed.allows(Some("http://GW.plant:8080"), host));
        assert!(listed.allows(Some("https://gw.plant:8080"), host));
        assert!(!listed.allows(Some("http://gw.plant:8081"), host));
        assert!(!listed.allows(Some("http://gw.plant:8080"), None));
        let none = AllowedOrigins::new(&[]);
        assert!(none.allows(None, host) && !none.allows(Some("https://dash.example"), host));
        assert!(AllowedOrigins::new(&["*".into()]).allows(Some("https://anything.test"), host));
    }

    #[tokio::test]
    async fn a_web_page_of_another_origin_is_refused_with_403_and_a_listed_one_is_served() {
        for (origin, served) in [("https://evil.test", false), ("https://dash.example", true)] {
            let (near, task) = server(1024);
            let mut req = request("/mqtt", Some("mqtt"));
            req.headers_mut()
                .insert(header::ORIGIN, HeaderValue::from_static(origin));
            match tokio_tungstenite::client_async(req, near).await {
                Ok((mut ws, _)) => {
                    assert!(served, "{origin} was served");
                    ws.close(None).await.unwrap();
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Err(tungstenite::Error::Http(response)) => {
                    assert!(!served, "{origin} was refused");
                    assert_eq!(response.status(), StatusCode::FORBIDDEN);
                }
                Err(other) => panic!("{origin}: {other}"),
            }
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_text_message_or_one_far_beyond_the_largest_packet_ends_the_stream() {
        let too_big = vec![0u8; 1024 + MESSAGE_SLACK + 1];
        for message in [
            Message::Text("hello".into()),
            Message::Binary(too_big.into()),
        ] {
            let (near, task) = server(1024);
            let (mut ws, _) = tokio_tungstenite::client_async(request("/mqtt", Some("mqtt")), near)
                .await
                .unwrap();
            ws.send(message).await.unwrap();
            // The server reads nothing and ends: the client sees the end.
            while let Some(Ok(_)) = ws.next().await {}
            assert!(task.await.unwrap().is_empty());
        }
    }
}
