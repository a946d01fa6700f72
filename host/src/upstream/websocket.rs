//! MQTT over WebSocket upstream: the client side of the upgrade
//! (subprotocol `mqtt`) on an open stream; the byte stream over it is
//! [`crate::websocket::byte_stream`], shared with the hub's own WebSocket
//! listeners.
//!
//! Owns the client handshake only, using tokio-tungstenite. It does not open
//! the TCP or TLS stream under it (the transport does) nor frame MQTT packets
//! (the connection does).

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::error::UpstreamError;
use super::transport::Io;
use crate::config::UpstreamAddr;
use crate::websocket::{byte_stream, SUBPROTOCOL};

/// Upgrades `io` (already through any proxy and TLS) to a WebSocket at
/// `path` on `addr`, and returns it as a byte stream.
pub async fn open(
    io: Box<dyn Io>,
    addr: &UpstreamAddr,
    path: &str,
) -> Result<Box<dyn Io>, UpstreamError> {
    let failed = |message: String| UpstreamError::WebSocket {
        addr: addr.to_string(),
        message,
    };
    let scheme = if addr.tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{}{path}", addr.authority())
        .into_client_request()
        .map_err(|e| failed(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let config = crate::websocket::config(None);
    let (ws, _response) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(Box::new(byte_stream(ws)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::Message;

    /// A WebSocket server on the far end of an in-memory stream that checks
    /// the upgrade request, then echoes binary frames back doubled.
    #[tokio::test]
    #[allow(clippy::result_large_err)] // tungstenite's callback type
    async fn the_byte_stream_rides_binary_frames_with_the_mqtt_subprotocol() {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let check = |request: &Request, mut response: Response| {
                assert_eq!(request.uri().path(), "/mqtt");
                assert_eq!(
                    request.headers()["Sec-WebSocket-Protocol"],
                    SUBPROTOCOL,
                    "the mqtt subprotocol is asked for"
                );
                response
                    .headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
                Ok(response)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(far, check)
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < 6 {
                match ws.next().await.unwrap().unwrap() {
                    Message::Binary(b) => got.extend_from_slice(&b),
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            }
            ws.send(Message::Ping(Bytes::from_static(b"hi")))
                .await
                .unwrap();
            ws.send(Message::Binary(Bytes::from(got.clone())))
                .await
                .unwrap();
            ws.send(Message::Binary(Bytes::from(got))).await.unwrap();
            ws.close(None).await.unwrap();
            // The pong is queued by the client: read until the close answer.
            while let Some(Ok(_)) = ws.next().await {}
        });
        let addr = UpstreamAddr::parse("ws://broker.example:9001").unwrap();
        let mut io = open(Box::new(near), &addr, "/mqtt").await.unwrap();
        io.write_all(b"\x10\x02").await.unwrap();
        io.write_all(b"\xc0\x00\xe0\x00").await.unwrap();
        io.flush().await.unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"\x10\x02\xc0\x00\xe0\x00\x10\x02\xc0\x00\xe0\x00");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_does_not_upgrade_is_a_websocket_error_naming_the_address() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(far.read_u8().await.unwrap());
            }
            far.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            far
        });
        let addr = UpstreamAddr::parse("ws://broker.example:9001/nope").unwrap();
        let err = match open(Box::new(near), &addr, "/nope").await {
            Ok(_) => panic!("a 404 is not a WebSocket"),
            Err(e) => e,
        };
        let _far = server.await.unwrap();
        let text = err.to_string();
        assert!(text.contains("ws://broker.example:9001/nope"), "{text}");
        assert!(text.contains("404"), "{text}");
    }
}
