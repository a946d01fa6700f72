//! A slow, far link between the system under test and the upstream: a TCP
//! proxy on loopback that delays every byte by half a round trip in each
//! direction and, optionally, serialises the bytes at a set bandwidth (this
//! kernel has no netem).
//!
//! Each direction is modelled as a link: a chunk read at time `a` starts
//! leaving at `max(a, link free)`, takes `len / bandwidth` to leave, and
//! arrives one-way delay later. The reader blocks once 1,024 chunks are in
//! flight on the link, so a slow link pushes back on the sender as TCP does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// What the emulated link is like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    pub rtt: Duration,
    /// Bytes per second in each direction; `None`: not limited.
    pub bytes_per_sec: Option<u64>,
}

impl LinkSpec {
    pub fn describe(&self) -> String {
        match self.bytes_per_sec {
            Some(b) => format!(
                "{} ms round trip, {} kbit/s each way",
                self.rtt.as_millis(),
                b * 8 / 1000
            ),
            None => format!(
                "{} ms round trip, bandwidth not limited",
                self.rtt.as_millis()
            ),
        }
    }
}

/// A running proxy; stops (and closes every connection) when dropped.
pub struct Proxy {
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `listen` and carries each connection to `target` over the
/// emulated link. A connection the target refuses is closed at once, as an
/// unreachable upstream would be.
pub async fn start(listen: SocketAddr, target: SocketAddr, spec: LinkSpec) -> Result<Proxy> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("link emulator cannot listen on {listen}"))?;
    let task = tokio::spawn(async move {
        // Dropping the set (when the proxy is dropped) aborts every pipe.
        let mut pipes = JoinSet::new();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            pipes.spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pipe(cr, sw, spec), pipe(sr, cw, spec));
            });
            while pipes.try_join_next().is_some() {}
        }
    });
    Ok(Proxy { task })
}

/// Carries one direction: read, hold for the link's time, write.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, spec: LinkSpec) {
    let one_way = spec.rtt / 2;
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut free = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let start = free.max(Instant::now());
            free = start + serialisation(n, spec.bytes_per_sec);
            if tx.send((free + one_way, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// How long `len` bytes take to leave at `bytes_per_sec`.
fn serialisation(len: usize, bytes_per_sec: Option<u64>) -> Duration {
    match bytes_per_sec {
        Some(b) if b > 0 => Duration::from_secs_f64(len as f64 / b as f64),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn proxied(spec: LinkSpec) -> (Proxy, TcpStream) {
        let target = echo_server().await;
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = free.local_addr().unwrap();
        drop(free);
        let proxy = start(listen, target, spec).await.unwrap();
        (proxy, TcpStream::connect(listen).await.unwrap())
    }

    #[tokio::test]
    async fn a_round_trip_through_the_link_takes_its_round_trip_time() {
        let rtt = Duration::from_millis(200);
        let (_proxy, mut conn) = proxied(LinkSpec {
            rtt,
            bytes_per_sec: None,
        })
        .await;
        let start = std::time::Instant::now();
        conn.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).await.unwrap();
        let took = start.elapsed();
        assert_eq!(&back, b"ping");
        assert!(took >= rtt, "echo took {took:?}, less than {rtt:?}");
    }

    #[tokio::test]
    async fn the_bandwidth_paces_a_large_write() {
        // 40 KB at 100 KB/s: at least 0.4 s each way.
        let (_proxy, mut conn) = proxied(LinkSpec {
            rtt: Duration::ZERO,
            bytes_per_sec: Some(100_000),
        })
        .await;
        let data = vec![7u8; 40_000];
        let start = std::time::Instant::now();
        let (mut r, mut w) = conn.split();
        let send = async {
            w.write_all(&data).await.unwrap();
        };
        let mut back = vec![0u8; data.len()];
        let recv = async {
            r.read_exact(&mut back).await.unwrap();
        };
        tokio::join!(send, recv);
        let took = start.elapsed();
        assert_eq!(back, data);
        assert!(
            took >= Duration::from_millis(400),
            "40 KB crossed a 100 KB/s link in {took:?}"
        );
    }
}
