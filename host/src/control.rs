//! Operator commands on the store, for a running hub or a stopped one.
//!
//! Owns the control socket `<storage>/control.sock` (a Unix socket, mode
//! 0600, one JSON request and one JSON answer per connection) and the
//! commands it carries: listing, replaying and purging dead letters. The
//! store's database is locked while the hub runs, so `edgehub queue
//! dead-letters` asks the running hub through this socket, and opens the
//! store itself when no hub runs. It does not decide what becomes a dead
//! letter (the forwarder does).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::store::{Appender, DeadLetter, Selection, Store, StoreError};

/// Longest request line read.
const MAX_REQUEST: u64 = 1 << 20;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The socket of the hub storing in `storage`.
pub fn socket_path(storage: &Path) -> PathBuf {
    storage.join("control.sock")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    ListDeadLetters { limit: usize },
    ReplayDeadLetters { keys: Option<Vec<u64>> },
    PurgeDeadLetters { keys: Option<Vec<u64>> },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    DeadLetters(Vec<DeadLetter>),
    Replayed(u64),
    Purged(u64),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("bad answer from the hub: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn selection(keys: Option<Vec<u64>>) -> Selection {
    keys.map_or(Selection::All, Selection::Keys)
}

/// Carries out `request` on the store. Store calls block: call it from
/// the blocking pool or a thread of its own.
pub async fn execute(store: &Store, appender: &Appender, request: Request) -> Answer {
    let result: Result<Answer, String> = async {
        match request {
            Request::ListDeadLetters { limit } => Ok(Answer::DeadLetters(
                store.dead_letters(limit).map_err(|e| e.to_string())?,
            )),
            Request::ReplayDeadLetters { keys } => {
                let which = selection(keys);
                let found = store
                    .dead_letter_records(&which, crate::clock::now_ms())
                    .map_err(|e| e.to_string())?;
                let keys: Vec<u64> = found.iter().map(|(k, _)| *k).collect();
                let records = found.into_iter().map(|(_, r)| r).collect::<Vec<_>>();
                if records.is_empty() {
                    return Ok(Answer::Replayed(0));
                }
                // Queued durably first, then removed: a crash between the two
                // leaves a copy in both, never in neither.
                appender
                    .append(records)
                    .await
                    .map_err(|e| format!("not replayed: {e}"))?;
                let n = store
                    .purge_dead_letters(&Selection::Keys(keys))
                    .map_err(|e| e.to_string())?;
                Ok(Answer::Replayed(n))
            }
            Request::PurgeDeadLetters { keys } => Ok(Answer::Purged(
                store
                    .purge_dead_letters(&selection(keys))
                    .map_err(|e| e.to_string())?,
            )),
        }
    }
    .await;
    result.unwrap_or_else(Answer::Error)
}

/// Makes the control socket of the hub storing in `storage` (call with
/// the store open: its lock says no other hub uses this folder, so a socket
/// file left here is stale).
pub fn bind(storage: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(storage);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests on `listener` until `shutdown`, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    store: Store,
    appender: Appender,
    shutdown: CancellationToken,
) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "control socket accept failed"); continue; }
            },
        };
        let (store, appender) = (store.clone(), appender.clone());
        tokio::spawn(async move {
            if let Err(e) = answer_one(stream, &store, &appender).await {
                tracing::warn!(error = %e, "control request failed");
            }
        });
    }
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer_one(stream: UnixStream, store: &Store, appender: &Appender) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let reading = reader.read_until(b'\n', &mut line);
    // A client that never finishes its line does not hold a task forever.
    let parsed = match tokio::time::timeout(REQUEST_TIMEOUT, reading).await {
        Ok(read) => read.map(|_| serde_json::from_slice::<Request>(&line)),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no request line in time",
        )),
    }?;
    let answer = match parsed {
        Ok(request) => {
            tracing::info!(?request, "control request");
            let (store, appender) = (store.clone(), appender.clone());
            let handle = tokio::runtime::Handle::current();
            // Store calls block: run the command on the blocking pool.
            tokio::task::spawn_blocking(move || {
                handle.block_on(execute(&store, &appender, request))
            })
            .await
            .unwrap_or_else(|e| Answer::Error(e.to_string()))
        }
        Err(e) => Answer::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).expect("answers serialize");
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends `request` to the hub running on `storage` and returns its answer.
pub async fn ask(storage: &Path, request: &Request) -> Result<Answer, ControlError> {
    let path = socket_path(storage);
    let socket = |source| ControlError::Socket {
        path: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(&path).await.map_err(socket)?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).await.map_err(socket)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .map_err(socket)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(format!("{e}: {answer:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{writer, Record};

    #[tokio::test]
    async fn a_running_hubs_dead_letters_are_listed_replayed_and_purged_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
        let rec = |t: &str| Record {
            enqueued_ms: 1,
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"b"),
            ttl_secs: None,
            priority: 0,
        };
        appender.append(vec![rec("a"), rec("b")]).await.unwrap();
        let head = store.head(0);
        store.move_head_to_dead_letters(head, "why a").unwrap();
        store.move_head_to_dead_letters(head + 1, "why b").unwrap();
        let shutdown = CancellationToken::new();
        let listener = bind(dir.path()).unwrap();
        let server = tokio::spawn(serve(
            listener,
            store.clone(),
            appender.clone(),
            shutdown.clone(),
        ));
        let list = ask(dir.path(), &Request::ListDeadLetters { limit: 10 }).await;
        let Answer::DeadLetters(list) = list.unwrap() else {
            panic!()
        };
        assert_eq!(
            list.iter()
                .map(|d| (d.topic.as_str(), d.reason.as_str()))
                .collect::<Vec<_>>(),
            [("a", "why a"), ("b", "why b")]
        );
        let replay = Request::ReplayDeadLetters {
            keys: Some(vec![head + 1]),
        };
        assert_eq!(ask(dir.path(), &replay).await.unwrap(), Answer::Replayed(1));
        let queued = store.read_from(store.head(0), 10).unwrap();
        assert_eq!(queued.len(), 1, "b is queued again");
        assert_eq!(queued[0].record().unwrap().topic, "b");
        assert!(
            queued[0].record().unwrap().enqueued_ms > 1,
            "with a fresh time"
        );
        let purge = Request::PurgeDeadLetters { keys: None };
        assert_eq!(ask(dir.path(), &purge).await.unwrap(), Answer::Purged(1));
        assert_eq!(store.dead_letter_count(), 0);
        let bad = ask(dir.path(), &Request::ListDeadLetters { limit: 1 })
            .await
            .unwrap();
        assert_eq!(bad, Answer::DeadLetters(vec![]));
        shutdown.cancel();
        server.await.unwrap();
        assert!(
            !socket_path(dir.path()).exists(),
            "the socket is removed on shutdown"
        );
        drop(appender);
        join.join().unwrap();
    }

    #[tokio::test]
    async fn a_malformed_request_gets_a_clear_error_and_the_socket_keeps_answering() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
        for bad in [
            &b"not json\n"[..],
            b"{\"command\":\"format-disk\"}\n",
            b"\xff\xfe\x00\n",
            b"{\"command\":\"list-dead-letters\"", // cut short: no limit, no newline
        ] {
            let (client, server) = UnixStream::pair().unwrap();
            let serving = tokio::spawn({
                let (store, appender) = (store.clone(), appender.clone());
                async move { answer_one(server, &store, &appender).await }
            });
            let (read, mut write) = client.into_split();
            write.write_all(bad).await.unwrap();
            write.shutdown().await.unwrap();
            let mut answer = String::new();
            BufReader::new(read).read_line(&mut answer).await.unwrap();
            match serde_json::from_str::<Answer>(&answer).unwrap() {
                Answer::Error(e) => assert!(e.starts_with("bad request"), "{e}"),
                other => panic!("{bad:?} answered {other:?}"),
            }
            serving.await.unwrap().unwrap();
        }
        let answer = execute(&store, &appender, Request::ListDeadLetters { limit: 10 }).await;
        assert_eq!(answer, Answer::DeadLetters(vec![]));
        drop(appender);
        join.join().unwrap();
    }
}
