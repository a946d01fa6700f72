//! One downstream connection, from CONNECT to close.
//!
//! Owns the connection's protocol state: packet ids in flight each way, the
//! QoS 2 receive set, keepalive, the will, and the order of acknowledgements.
//! Publishes read in one go are routed as one batch; their PUBACK/PUBREC go
//! out, in the order received, only once the router says they are durable
//! (or immediately for local-only topics, still in order). It does not decide
//! where messages go (the router does) nor store anything.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::codec::{
    self, CodecError, ConnAckCode, Connect, DisconnectReason, Inbound, Outbound, Protocol,
    PubReason, Publish, SubRefusal,
};
use super::liveness::{Heartbeat, Liveness, Signal};
use crate::auth::{authz, Auth, ClientCredentials, Principal, Refusal};
use crate::broker::{BrokerHandle, Delivery, Receipt, OUTBOX};
use crate::c2d::CloudToDevice;
use crate::iothub::{self, Request};
use crate::message::Message;
use crate::methods::{self, Methods};
use crate::metrics::{DropReason, Metrics};
use crate::routing::{Durable, Router};
use crate::store::AppendError;
use crate::topic;
use crate::twins::Twins;

/// How long a new connection may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 deliveries to this client awaiting its PUBACK.
const MAX_OUTGOING_INFLIGHT: usize = 256;

/// A connection's read buffer: none while the client is quiet (a read
/// then goes through [`QUIET_READ`] bytes on the stack and keeps only what
/// came), at least this once it sends more, doubling on demand up to
/// [`READ_MAX`] bytes per read while it is busy, and let go once it is
/// quiet again (10,000 idle clients cost little).
const READ_MIN: usize = 512;
/// What a quiet client's read can take at once: a sensor's publish, with
/// its properties, in one read.
const QUIET_READ: usize = 2048;
const READ_MAX: usize = 64 * 1024;
/// A write buffer is let go after a write smaller than this, or once it
/// has grown larger than [`WRITE_KEEP`].
const WRITE_SMALL: usize = 256;
const WRITE_KEEP: usize = 4096;

/// What every session shares.
pub struct SessionContext {
    pub auth: Arc<Auth>,
    pub router: Router,
    pub broker: BrokerHandle,
    /// Answers the twin requests of identities.
    pub twins: Arc<Twins>,
    /// Takes identities' answers to method calls.
    pub methods: Arc<Methods>,
    /// Cloud-to-device messages waiting for their devices.
    pub c2d: Arc<CloudToDevice>,
    /// Messages routed to module inputs, waiting for their modules.
    pub inputs: Arc<crate::inputs::ModuleInputs>,
    pub metrics: Arc<Metrics>,
    /// Watches every connection's keepalive, and tells them of a shutdown
    /// or a new scope.
    pub liveness: Arc<Liveness>,
    pub max_message_bytes: usize,
    /// How long an MQTT 3.1.1 persistent session outlives its connection.
    pub session_expiry_secs: u32,
    pub next_conn_id: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("client disconnected")]
    Disconnect,
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("connection closed by the client")]
    Closed,
    #[error("keepalive expired")]
    KeepAlive,
    #[error("taken over by a new connection with the same client id")]
    TakenOver,
    #[error("hub shutting down")]
    Shutdown,
    #[error("storage quota full: {0}")]
    Quota(AppendError),
    #[error("published a topic of {len} bytes, over store.max_topic_bytes ({max})")]
    TopicTooLong { len: usize, max: usize },
    #[error("storage failed: {0}")]
    Storage(AppendError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What woke a waiting session.
enum Event {
    Signal(Signal),
    /// The store's word on the oldest batch's acks (`None`: no word, the
    /// router is gone).
    Durable(Option<Result<(), AppendError>>),
    /// Whether the oldest PUBREC waiting for the store was stored.
    Released(bool),
    /// A delivery; `None`: the connection was taken over.
    Delivery(Option<Delivery>),
    Read(std::io::Result<usize>),
}

/// What a session does after an event.
enum Next {
    /// Go on waiting.
    Done,
    /// Handle the bytes read.
    Read,
    /// End after writing what is owed (acks before a close).
    Failed(SessionEnd),
    /// End now.
    End(SessionEnd),
}

/// What a connection's task does after a turn.
enum Step {
    /// Handle the bytes read (a future of its own: the only await that
    /// holds more than a pointer).
    Read,
    /// The session is over (its turn says why).
    End,
}

/// Where a connection's turns stand between two polls.
#[derive(Default)]
struct Turn {
    /// The last read's length, and whether it filled the buffer.
    last_read: usize,
    filled: bool,
    read_first: bool,
    /// Bytes of the session's output already written (then flushed).
    written: usize,
    /// Why the session ends: at once, or (when it failed) once what it
    /// owes is written. Boxed: the turn is held while the client is idle.
    ending: Option<Box<SessionEnd>>,
}

/// Acknowledgement owed for one received publish.
#[derive(Clone, Copy)]
struct Ack {
    pkid: u16,
    qos: u8,
    stored: bool,
    /// Refused before routing (MQTT 5: this reason in the PUBACK).
    refused: Option<PubReason>,
}

/// Acks of one routed batch, released together once `durable` resolves.
struct Pending {
    durable: Option<Durable>,
    outcome: Option<Result<(), AppendError>>,
    acks: Vec<Ack>,
    /// QoS 0 messages of the batch sent to the store (no ack to carry them).
    stored_qos0: u64,
}

/// A connection whose session is open: what its task waits on while the
/// client is quiet, in one allocation. What runs once per connection (the
/// CONNECT, authentication, the end) runs in futures of its own, boxed and
/// freed once done, so the task itself holds little more than the wait.
pub struct Live<S> {
    session: Session,
    stream: S,
    buf: BytesMut,
    peer: String,
}

/// A new connection whose CONNECT was read, to be opened as a session
/// ([`Hello::open`]) or refused ([`Hello::refuse_busy`]).
pub struct Hello<S> {
    stream: S,
    buf: BytesMut,
    connect: Connect,
    peer: String,
}

/// Reads a new connection's CONNECT; `None` when the connection ended
/// instead (closed, timed out, not MQTT: logged, and an unsupported
/// protocol level answered). Never panics on client input.
pub async fn hello<S>(mut stream: S, peer: String, ctx: &SessionContext) -> Option<Hello<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_MIN);
    match read_connect(&mut stream, &mut buf, ctx.max_message_bytes).await {
        Ok(connect) => Some(Hello {
            stream,
            buf,
            connect,
            peer,
        }),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "connection refused");
            if let SessionEnd::Codec(CodecError::UnsupportedProtocol { .. }) = e {
                let mut out = BytesMut::new();
                let v4 = codec::Codec {
                    protocol: Protocol::V4,
                    max_size: usize::MAX,
                };
                v4.write(
                    Outbound::ConnAck {
                        code: ConnAckCode::UnsupportedProtocol,
                        session_present: false,
                        assigned_client_id: None,
                    },
                    &mut out,
                );
                goodbye(&mut stream, &out).await;
            }
            None
        }
    }
}

impl<S> Hello<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Opens the session: authenticates the CONNECT and answers it; `None`
    /// when it was refused. `client_certs`: the DER certificate chain a TLS
    /// client presented (end-entity first; empty when none).
    pub async fn open(
        self,
        client_certs: Vec<Vec<u8>>,
        ctx: Arc<SessionContext>,
    ) -> Option<Box<Live<S>>> {
        let Hello {
            mut stream,
            mut buf,
            connect,
            peer,
        } = self;
        let session = Session::accept(connect, &client_certs, &peer, &ctx, &mut stream).await?;
        drop(client_certs);
        // The CONNECT's buffer: an idle connection holds none.
        size_read_buffer(&mut buf, 0, false);
        ctx.metrics.client_connected(1);
        if session.resumed {
            // A resumed session kept its subscriptions: what waits for it (its
            // device's cloud-to-device messages, module inputs) goes out now.
            if session.device_inbox().is_some() {
                ctx.c2d.push(&session.client_id).await;
            }
            ctx.inputs.push_all().await;
        }
        Some(Box::new(Live {
            session,
            stream,
            buf,
            peer,
        }))
    }

    /// Answers a client beyond the hub's limit: its CONNECT gets a refusal
    /// (3.1.1: 0x03 server unavailable; 5: 0x97 quota exceeded) at once,
    /// then the connection is closed.
    pub async fn refuse_busy(self, limit: usize, ctx: &SessionContext) {
        let Hello {
            mut stream,
            connect,
            peer,
            ..
        } = self;
        ctx.metrics.connection_refused();
        tracing::warn!(%peer, client = %connect.client_id, limit, "CONNECT refused: the hub serves max_connections clients already");
        let codec = codec::Codec {
            protocol: connect.protocol,
            max_size: usize::MAX,
        };
        let mut out = BytesMut::new();
        codec.write(
            Outbound::ConnAck {
                code: ConnAckCode::Busy,
                session_present: false,
                assigned_client_id: None,
            },
            &mut out,
        );
        goodbye(&mut stream, &out).await;
    }
}

impl<S> Live<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Serves the session until it ends, then closes the connection and
    /// hands back what the client did not take.
    pub async fn serve(mut self: Box<Self>) {
        let mut turn = Turn::default();
        let end = loop {
            // (Only pointers are held across these awaits: what an idle
            // connection's task holds is this loop, its turn and a box.)
            match poll_fn(|cx| self.poll_turn(cx, &mut turn)).await {
                Step::End => break turn.ending.take().map_or(SessionEnd::Closed, |end| *end),
                Step::Read => {
                    let live = &mut *self;
                    match Box::pin(live.session.on_bytes(&mut live.buf)).await {
                        Ok(()) => size_read_buffer(&mut live.buf, turn.last_read, turn.filled),
                        Err(end) => turn.ending = Some(Box::new(end)),
                    }
                }
            }
        };
        Box::pin(self.close(end)).await;
    }

    /// Runs the session's turns in place until it has bytes to handle or
    /// ends: writes what it owes (acks before a close, even when it
    /// failed), then waits for its next event and handles it.
    /// On [`Step::End`], `turn.ending` says why.
    fn poll_turn(&mut self, cx: &mut Context<'_>, turn: &mut Turn) -> Poll<Step> {
        let Live {
            session,
            stream,
            buf,
            ..
        } = self;
        loop {
            if let Err(e) = ready!(session.poll_write_out(cx, stream, turn)) {
                turn.ending = Some(Box::new(SessionEnd::Io(e)));
                return Poll::Ready(Step::End);
            }
            if turn.ending.is_some() {
                return Poll::Ready(Step::End);
            }
            let can_deliver = session.outgoing.len() < MAX_OUTGOING_INFLIGHT;
            let room = match buf.capacity() {
                0 => QUIET_READ,
                capacity => (capacity - buf.len()).max(64),
            };
            let event = ready!(session.poll_event(cx, stream, buf, can_deliver, turn.read_first));
            // The socket and the outbox take turns at being looked at first.
            turn.read_first = !turn.read_first;
            match session.on_event(event, room, turn) {
                Next::End(end) => {
                    turn.ending = Some(Box::new(end));
                    return Poll::Ready(Step::End);
                }
                Next::Failed(end) => turn.ending = Some(Box::new(end)),
                Next::Done => size_read_buffer(buf, turn.last_read, turn.filled),
                Next::Read => return Poll::Ready(Step::Read),
            }
        }
    }

    async fn close(self: Box<Self>, end: SessionEnd) {
        let Live {
            session,
            mut stream,
            peer,
            ..
        } = *self;
        session.ctx.metrics.client_connected(-1);
        match &end {
            SessionEnd::Disconnect | SessionEnd::Closed | SessionEnd::Shutdown => {
                tracing::debug!(client = %session.client_id, %peer, reason = %end, "session ended")
            }
            _ => {
                tracing::warn!(client = %session.client_id, %peer, reason = %end, "session closed")
            }
        }
        let mut out = BytesMut::new();
        if let Some(reason) = disconnect_reason(&end) {
            session.codec.write(Outbound::Disconnect(reason), &mut out);
        }
        goodbye(&mut stream, &out).await;
        session.finish(&end).await;
    }
}

/// How long a connection's last bytes (a DISCONNECT, a refusal) and its
/// close may take: a peer that does not read must not hold up the end of
/// its session (its will, its deliveries handed back) for ever.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes a connection's last `bytes` (if any) and closes it, within
/// [`GOODBYE_TIMEOUT`].
async fn goodbye<S>(stream: &mut S, bytes: &[u8])
where
    S: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        if !bytes.is_empty() {
            let _ = send(stream, bytes).await;
        }
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Writes `bytes` and flushes them: a TLS or WebSocket stream may hold
/// written bytes until it is flushed (a TCP stream's flush does nothing).
async fn send<S>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// `principal` behind an `Arc`: open and anonymous clients (the default
/// hub's, every one of them) share one of each.
fn shared_principal(principal: Principal) -> Arc<Principal> {
    static OPEN: LazyLock<Arc<Principal>> = LazyLock::new(|| Arc::new(Principal::Open));
    static ANONYMOUS: LazyLock<Arc<Principal>> = LazyLock::new(|| Arc::new(Principal::Anonymous));
    match principal {
        Principal::Open => OPEN.clone(),
        Principal::Anonymous => ANONYMOUS.clone(),
        identity => Arc::new(identity),
    }
}

/// Reads what the client sent into `buf`. A quiet client's (no buffer)
/// goes through the stack, so a small packet takes one read, and `buf`
/// then holds just its bytes.
fn poll_read<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() > 0 {
        return tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf);
    }
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); QUIET_READ];
    let mut read = ReadBuf::uninit(&mut scratch);
    ready!(Pin::new(stream).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

/// Grows `buf` when the last read (of `last_read` bytes) nearly filled it,
/// and lets it go when the client has gone quiet.
/// `filled`: the read took all the room there was (more is likely waiting).
fn size_read_buffer(buf: &mut BytesMut, last_read: usize, filled: bool) {
    if buf.is_empty() && !filled && last_read < READ_MIN {
        *buf = BytesMut::new();
        return;
    }
    let spare = buf.capacity() - buf.len();
    if spare < READ_MIN || last_read >= spare {
        let grow = (2 * last_read).max(buf.len()).clamp(READ_MIN, READ_MAX);
        buf.reserve(grow);
    }
}

fn disconnect_reason(end: &SessionEnd) -> Option<DisconnectReason> {
    Some(match end {
        SessionEnd::KeepAlive => DisconnectReason::KeepAliveTimeout,
        SessionEnd::NotAuthorized(_) => DisconnectReason::NotAuthorized,
        SessionEnd::TakenOver => DisconnectReason::SessionTakenOver,
        SessionEnd::Shutdown => DisconnectReason::ServerShuttingDown,
        SessionEnd::Quota(_) => DisconnectReason::QuotaExceeded,
        SessionEnd::Codec(CodecError::TooLarge { .. }) => DisconnectReason::PacketTooLarge,
        SessionEnd::Codec(CodecError::Malformed(_)) => DisconnectReason::MalformedPacket,
        SessionEnd::Codec(_) | SessionEnd::Protocol(_) => DisconnectReason::ProtocolError,
        _ => return None,
    })
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Connect, SessionEnd> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if let Some(c) = codec::read_connect(buf, max)? {
            return Ok(c);
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(buf))
            .await
            .map_err(|_| SessionEnd::Protocol("no CONNECT within 10 s".into()))??;
        if n == 0 {
            return Err(SessionEnd::Closed);
        }
    }
}

struct Session {
    /// Shared with every message this client publishes (their publisher).
    client_id: Arc<str>,
    /// Who this session acts for; checked again whenever the scope changes.
    /// Shared: open and anonymous clients cost no allocation of their own
    /// ([`shared_principal`]).
    principal: Arc<Principal>,
    /// Its keepalive, the hub's shutdown, a new scope: told by the hub's
    /// [`Liveness`](super::liveness::Liveness).
    heartbeat: Arc<Heartbeat>,
    conn_id: u64,
    codec: codec::Codec,
    /// Boxed, as `principal`: a session held by an idle connection stays small.
    will: Option<Box<Publish>>,
    ctx: Arc<SessionContext>,
    /// Deliveries from the broker; closed when the connection is taken over.
    outbox: crate::broker::Outbox,
    /// Acks owed, in the order the publishes arrived.
    pending: VecDeque<Pending>,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    qos2_received: BTreeSet<u16>,
    /// QoS 1 and 2 deliveries sent to the client and not yet done, by
    /// packet id.
    outgoing: BTreeMap<u16, Sent>,
    pkids: crate::packet_id::PacketIds,
    /// QoS 2 deliveries of kept messages the client received (PUBREC),
    /// whose PUBREL waits until the store knows it, in order.
    releasing: VecDeque<(u16, tokio::sync::oneshot::Receiver<()>)>,
    out: BytesMut,
    /// Whether the broker resumed a persistent session (its subscriptions).
    resumed: bool,
}

/// A QoS 1 or 2 delivery out with the client. The receipt (of a message
/// its owner keeps) is told when the client has it: its PUBACK, or for QoS
/// 2 its PUBCOMP.
enum Sent {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published {
        publish: Publish,
        receipt: Option<Receipt>,
    },
    /// QoS 2: PUBREC came and PUBREL went; waiting for PUBCOMP. A resumed
    /// session sends PUBREL again for these (never the PUBLISH).
    Released { receipt: Option<Receipt> },
}

impl Session {
    async fn accept<S: AsyncWrite + Unpin>(
        connect: Connect,
        client_certs: &[Vec<u8>],
        peer: &str,
        ctx: &Arc<SessionContext>,
        stream: &mut S,
    ) -> Option<Self> {
        let codec = codec::Codec {
            protocol: connect.protocol,
            max_size: ctx.max_message_bytes,
        };
        let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let mut out = BytesMut::new();
        let refuse = |code: ConnAckCode, why: &str, out: &mut BytesMut| {
            tracing::warn!(%peer, client = %connect.client_id, reason = why, "CONNECT refused");
            codec.write(
                Outbound::ConnAck {
                    code,
                    session_present: false,
                    assigned_client_id: None,
                },
                out,
            );
        };
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !connect.clean_start && connect.protocol == Protocol::V4 {
                refuse(
                    ConnAckCode::BadClientId,
                    "empty client id needs a clean session",
                    &mut out,
                );
                let _ = send(stream, &out).await;
                return None;
            }
            let id = format!("edgehub-{conn_id}");
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        let client_id: Arc<str> = client_id.into();
        // Registered before the client is authenticated: a scope applied
        // from here on is checked again.
        let heartbeat = ctx.liveness.register(
            (connect.keep_alive > 0)
                .then(|| Duration::from_millis(connect.keep_alive as u64 * 1500)),
        );
        let principal = match ctx.auth.authenticate(
            &client_id,
            ClientCredentials {
                username: connect.username.as_deref(),
                password: connect.password.as_deref(),
                certificates: client_certs,
            },
        ) {
            Ok(p) => p,
            Err(refusal) => {
                let (code, why) = match &refusal {
                    Refusal::BadCredentials(why) => (ConnAckCode::BadCredentials, why),
                    Refusal::NotAuthorized(why) => (ConnAckCode::NotAuthorized, why),
                };
                refuse(code, why, &mut out);
                let _ = send(stream, &out).await;
                return None;
            }
        };
        if let Some(w) = &connect.will {
            let why = if !topic::valid_name(&w.topic) {
                Some("invalid will topic")
            } else if !authz::may_publish(&principal, ctx.auth.edge_id(), &w.topic) {
                ctx.metrics.authz_refused(1);
                Some("will topic not allowed for this client")
            } else {
                None
            };
            if let Some(why) = why {
                refuse(ConnAckCode::NotAuthorized, why, &mut out);
                let _ = send(stream, &out).await;
                return None;
            }
        }
        let expiry_secs = match connect.protocol {
            Protocol::V4 if connect.clean_start => crate::broker::SESSION_ENDS,
            Protocol::V4 => ctx.session_expiry_secs.max(1),
            Protocol::V5 => connect.session_expiry.unwrap_or(0),
        };
        let (tx, rx) = crate::broker::outbox(OUTBOX);
        let attached = ctx
            .broker
            .connect(&client_id, conn_id, expiry_secs, !connect.clean_start, tx)
            .await?;
        let mut session = Session {
            client_id,
            heartbeat,
            conn_id,
            codec,
            principal: shared_principal(principal),
            will: connect.will.map(|w| {
                Box::new(Publish {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos.min(2),
                    retain: w.retain,
                    dup: false,
                    pkid: 0,
                })
            }),
            ctx: ctx.clone(),
            outbox: rx,
            pending: VecDeque::new(),
            qos2_received: BTreeSet::new(),
            outgoing: BTreeMap::new(),
            pkids: Default::default(),
            releasing: VecDeque::new(),
            out,
            resumed: attached.session_present,
        };
        session.codec.write(
            Outbound::ConnAck {
                code: ConnAckCode::Success,
                session_present: attached.session_present,
                assigned_client_id: assigned,
            },
            &mut session.out,
        );
        for (pkid, receipt) in attached.released {
            session
                .codec
                .write(Outbound::PubRel(pkid), &mut session.out);
            session.outgoing.insert(pkid, Sent::Released { receipt });
        }
        for p in attached.queued {
            session.deliver(p);
        }
        if send(stream, &session.out).await.is_err() {
            return None;
        }
        session.out.clear();
        tracing::debug!(client = %session.client_id, %peer, protocol = ?session.codec.protocol, "client connected");
        Some(session)
    }

    /// Writes what the session owes the client and flushes it, across
    /// polls (`turn` keeps how much is out). The write buffer is let go
    /// after a small write (an idle connection holds none) or a large one;
    /// a busy connection keeps its own.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
        turn: &mut Turn,
    ) -> Poll<std::io::Result<()>> {
        while turn.written < self.out.len() {
            let n = ready!(Pin::new(&mut *stream).poll_write(cx, &self.out[turn.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            turn.written += n;
        }
        if turn.written > 0 {
            // A TLS or WebSocket stream may hold written bytes until it is
            // flushed (a TCP stream's flush does nothing).
            ready!(Pin::new(&mut *stream).poll_flush(cx))?;
            if std::mem::take(&mut turn.written) < WRITE_SMALL || self.out.capacity() > WRITE_KEEP {
                self.out = BytesMut::new();
            } else {
                self.out.clear();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Handles what woke the session, but for the bytes read (the caller
    /// hands them to [`on_bytes`](Self::on_bytes)). `room`: what the buffer
    /// had room for before a read.
    fn on_event(&mut self, event: Event, room: usize, turn: &mut Turn) -> Next {
        match event {
            Event::Signal(Signal::Shutdown) => Next::End(SessionEnd::Shutdown),
            Event::Signal(Signal::KeepAlive) => Next::End(SessionEnd::KeepAlive),
            Event::Signal(Signal::ScopeChanged) => {
                let scope = self.ctx.auth.watch().borrow().clone();
                match self
                    .ctx
                    .auth
                    .still_allowed(&self.principal, scope.as_deref())
                {
                    Ok(()) => Next::Done,
                    Err(why) => Next::Failed(SessionEnd::NotAuthorized(why)),
                }
            }
            Event::Durable(outcome) => {
                let front = self
                    .pending
                    .front_mut()
                    .expect("polled the front's durable");
                front.durable = None;
                front.outcome = Some(outcome.unwrap_or(Err(AppendError::Closed)));
                match self.release_acks() {
                    Ok(()) => Next::Done,
                    Err(end) => Next::Failed(end),
                }
            }
            Event::Released(stored) => {
                let (pkid, _) = self.releasing.pop_front().expect("polled the front");
                // Not stored (the hub is stopping, or its store broke):
                // no PUBREL now; it goes on the client's next connection.
                if stored {
                    self.codec.write(Outbound::PubRel(pkid), &mut self.out);
                }
                Next::Done
            }
            Event::Delivery(None) => Next::End(SessionEnd::TakenOver),
            Event::Delivery(Some(p)) => {
                self.deliver(p);
                while self.outgoing.len() < MAX_OUTGOING_INFLIGHT {
                    match self.outbox.try_recv() {
                        Some(p) => self.deliver(p),
                        None => break,
                    }
                }
                Next::Done
            }
            Event::Read(Ok(0)) => Next::End(SessionEnd::Closed),
            Event::Read(Ok(n)) => {
                turn.last_read = n;
                turn.filled = n >= room;
                self.heartbeat.heard(&self.ctx.liveness);
                Next::Read
            }
            Event::Read(Err(e)) => Next::End(SessionEnd::Io(e)),
        }
    }

    /// What the session waits for, polled in place (no future of its own
    /// to hold while the connection is idle): the hub's signal first, then
    /// the store's word on the oldest acks and PUBREL, then the outbox and
    /// the socket, in the order given.
    fn poll_event<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
        buf: &mut BytesMut,
        can_deliver: bool,
        read_first: bool,
    ) -> Poll<Event> {
        if let Poll::Ready(s) = self.heartbeat.poll_signal(cx) {
            return Poll::Ready(Event::Signal(s));
        }
        if let Some(durable) = self.pending.front_mut().and_then(|p| p.durable.as_mut()) {
            if let Poll::Ready(outcome) = Pin::new(durable).poll(cx) {
                return Poll::Ready(Event::Durable(outcome.ok()));
            }
        }
        if let Some((_, stored)) = self.releasing.front_mut() {
            if let Poll::Ready(stored) = Pin::new(stored).poll(cx) {
                return Poll::Ready(Event::Released(stored.is_ok()));
            }
        }
        for read in [read_first, !read_first] {
            let event = if read {
                poll_read(stream, cx, buf).map(Event::Read)
            } else {
                self.outbox.poll_next(cx, can_deliver).map(Event::Delivery)
            };
            if event.is_ready() {
                return event;
            }
        }
        Poll::Pending
    }

    /// Handles every whole packet in `buf`.
    async fn on_bytes(&mut self, buf: &mut BytesMut) -> Result<(), SessionEnd> {
        let mut local = Vec::new();
        let mut upstream = Vec::new();
        let mut acks = Vec::new();
        let mut requests = Vec::new();
        // Every publish of one read is taken at the same time.
        let now = crate::clock::now_ms();
        let result = loop {
            let packet = match self.codec.read(buf) {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(e) => break Err(SessionEnd::Codec(e)),
            };
            match packet {
                Inbound::Publish(p) => {
                    self.ctx.metrics.received(1);
                    let accepted = if p.topic.starts_with(iothub::ROOT) {
                        self.accept_request(p, &mut acks, &mut requests)
                    } else {
                        self.accept_publish(p, now, &mut local, &mut upstream, &mut acks)
                    };
                    if let Err(e) = accepted {
                        break Err(e);
                    }
                }
                other => {
                    self.route(&mut local, &mut upstream, &mut acks).await;
                    self.answer(&mut requests).await;
                    if let Err(e) = self.on_control(other).await {
                        break Err(e);
                    }
                }
            }
        };
        self.route(&mut local, &mut upstream, &mut acks).await;
        self.answer(&mut requests).await;
        self.release_acks()?;
        result
    }

    /// Takes a publish on `$iothub/...`: a request to answer, never a
    /// message to route. A topic that is not a request this client may send
    /// is refused like any topic it may not use.
    fn accept_request(
        &mut self,
        p: Publish,
        acks: &mut Vec<Ack>,
        requests: &mut Vec<(Request, bytes::Bytes)>,
    ) -> Result<(), SessionEnd> {
        let request = match (&*self.principal, Request::parse(&p.topic)) {
            (Principal::Identity(..), Ok(r)) => Ok(r),
            (Principal::Identity(..), Err(e)) => Err(e.to_string()),
            _ => Err("$iothub requests need a device or module identity".into()),
        };
        match request {
            Ok(r) => {
                if p.qos > 0 {
                    acks.push(Ack {
                        pkid: p.pkid,
                        qos: p.qos,
                        stored: false,
                        refused: None,
                    });
                }
                requests.push((r, p.payload));
                Ok(())
            }
            Err(why) => {
                tracing::warn!(client = %self.client_id, topic = %p.topic, reason = %why, "publish refused: not authorized");
                self.ctx.metrics.authz_refused(1);
                let end = SessionEnd::NotAuthorized(format!("publish to {}", p.topic));
                self.refuse(p, PubReason::NotAuthorized, end, acks)
            }
        }
    }

    /// Answers this connection's `$iothub` requests, in order, on its own
    /// `$iothub/...` subscriptions.
    async fn answer(&mut self, requests: &mut Vec<(Request, bytes::Bytes)>) {
        let Principal::Identity(id, _) = &*self.principal else {
            requests.clear();
            return;
        };
        let id = id.client_id();
        for (request, body) in requests.drain(..) {
            let (topic, payload) = match request {
                Request::TwinGet { rid } => match self.ctx.twins.get(&id).await {
                    Ok(doc) => (
                        iothub::twin_response(200, &rid, None),
                        doc.to_string().into(),
                    ),
                    Err(e) => {
                        tracing::error!(client = %self.client_id, error = %e, "twin request failed");
                        (iothub::twin_response(e.status(), &rid, None), e.body())
                    }
                },
                Request::ReportedPatch { rid } => {
                    match self.ctx.twins.patch_reported(&id, &body).await {
                        Ok(v) => (iothub::twin_response(204, &rid, Some(v)), Vec::new()),
                        Err(e) => {
                            tracing::warn!(client = %self.client_id, error = %e, "reported patch refused");
                            (iothub::twin_response(e.status(), &rid, None), e.body())
                        }
                    }
                }
                Request::MethodResponse { status, rid } => {
                    let (status, body) = if body.len() > methods::MAX_PAYLOAD {
                        tracing::warn!(client = %self.client_id, bytes = body.len(), "method answer over the size limit; the caller gets 400");
                        let why = format!(
                            "the answer is {} bytes, over the limit of {}",
                            body.len(),
                            methods::MAX_PAYLOAD
                        );
                        (
                            400,
                            serde_json::json!({ "message": why }).to_string().into(),
                        )
                    } else {
                        (status, body)
                    };
                    if !self.ctx.methods.answer(&id, &rid, status, body) {
                        tracing::warn!(client = %self.client_id, status, %rid, "method answer ignored: no call with this $rid is waiting for this client");
                    }
                    continue;
                }
            };
            let answer = Delivery {
                topic,
                payload: payload.into(),
                qos: 1,
                retain: false,
                dup: false,
                receipt: None,
            };
            self.ctx.broker.send_to(&self.client_id, answer).await;
        }
    }

    /// Refuses one publish: MQTT 5 gets `reason` in its acknowledgement,
    /// 3.1.1 (which has no negative PUBACK) the end of the connection.
    fn refuse(
        &mut self,
        p: Publish,
        reason: PubReason,
        end: SessionEnd,
        acks: &mut Vec<Ack>,
    ) -> Result<(), SessionEnd> {
        if self.codec.protocol == Protocol::V4 {
            return Err(end);
        }
        if p.qos > 0 {
            self.qos2_received.remove(&p.pkid);
            acks.push(Ack {
                pkid: p.pkid,
                qos: p.qos,
                stored: false,
                refused: Some(reason),
            });
        }
        Ok(())
    }

    /// Checks one received publish, notes the ack it is owed and turns it
    /// into the message routed (taken at `now`).
    fn accept_publish(
        &mut self,
        p: Publish,
        now: u64,
        local: &mut Vec<Message>,
        upstream: &mut Vec<Message>,
        acks: &mut Vec<Ack>,
    ) -> Result<(), SessionEnd> {
        if !topic::valid_name(&p.topic) {
            return Err(SessionEnd::Protocol(format!(
                "invalid topic name {:?}",
                p.topic
            )));
        }
        if p.qos > 2 {
            return Err(SessionEnd::Protocol("QoS 3".into()));
        }
        if p.qos == 2 && !self.qos2_received.insert(p.pkid) {
            // A resend of a QoS 2 publish we already have: acknowledge only.
            acks.push(Ack {
                pkid: p.pkid,
                qos: 2,
                stored: false,
                refused: None,
            });
            return Ok(());
        }
        let stored = self.ctx.router.upstream_bound(&p.topic);
        let max = self.ctx.router.max_topic_bytes();
        let refusal = if !authz::may_publish(&self.principal, self.ctx.auth.edge_id(), &p.topic) {
            tracing::warn!(client = %self.client_id, topic = %p.topic, "publish refused: not authorized");
            self.ctx.metrics.authz_refused(1);
            let end = SessionEnd::NotAuthorized(format!("publish to {}", p.topic));
            Some((PubReason::NotAuthorized, end))
        } else if stored && p.topic.len() > max {
            // It could never be stored: say so rather than acknowledge it.
            let len = p.topic.len();
            tracing::warn!(client = %self.client_id, len, max, "publish refused: its topic is longer than store.max_topic_bytes");
            self.ctx.metrics.invalid_topic("too_long", "");
            Some((
                PubReason::TopicNameInvalid,
                SessionEnd::TopicTooLong { len, max },
            ))
        } else {
            None
        };
        if let Some((reason, end)) = refusal {
            return self.refuse(p, reason, end, acks);
        }
        if p.qos > 0 {
            acks.push(Ack {
                pkid: p.pkid,
                qos: p.qos,
                stored,
                refused: None,
            });
        }
        let publisher = self.client_id.clone();
        let m = Message::published(publisher, p.topic, p.payload, p.qos, p.retain, now);
        if stored {
            upstream.push(m);
        } else {
            local.push(m);
        }
        Ok(())
    }

    /// Routes what `on_bytes` gathered and queues its acks behind earlier ones.
    async fn route(
        &mut self,
        local: &mut Vec<Message>,
        upstream: &mut Vec<Message>,
        acks: &mut Vec<Ack>,
    ) {
        if local.is_empty() && upstream.is_empty() && acks.is_empty() {
            return;
        }
        let stored_qos0 = upstream.iter().filter(|m| m.qos == 0).count() as u64;
        let (local, upstream) = (std::mem::take(local), std::mem::take(upstream));
        let durable = self.ctx.router.dispatch(local, upstream).await;
        self.pending.push_back(Pending {
            durable,
            outcome: None,
            acks: std::mem::take(acks),
            stored_qos0,
        });
    }

    /// Writes the acks of every batch at the front whose outcome is known.
    fn release_acks(&mut self) -> Result<(), SessionEnd> {
        while let Some(front) = self.pending.front_mut() {
            if let Some(rx) = front.durable.as_mut() {
                match rx.try_recv() {
                    Ok(r) => front.outcome = Some(r),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(_) => front.outcome = Some(Err(AppendError::Closed)),
                }
                front.durable = None;
            }
            let front = self.pending.pop_front().expect("front exists");
            let outcome = front.outcome.unwrap_or(Ok(()));
            let refused = match &outcome {
                Ok(()) => None,
                Err(e) => {
                    let n = front.acks.iter().filter(|a| a.stored).count() as u64;
                    self.ctx.metrics.refused(n);
                    self.ctx
                        .metrics
                        .messages_dropped(DropReason::StoreRefused, front.stored_qos0);
                    Some(e.clone())
                }
            };
            for ack in front.acks {
                let reason = match (&refused, ack.stored) {
                    _ if ack.refused.is_some() => ack.refused.expect("some"),
                    (Some(e), true) if e.is_full() => PubReason::QuotaExceeded,
                    (Some(_), true) => PubReason::UnspecifiedError,
                    _ => PubReason::Success,
                };
                if reason != PubReason::Success {
                    self.qos2_received.remove(&ack.pkid);
                }
                let packet = match ack.qos {
                    1 => Outbound::PubAck {
                        pkid: ack.pkid,
                        reason,
                    },
                    _ => Outbound::PubRec {
                        pkid: ack.pkid,
                        reason,
                    },
                };
                self.codec.write(packet, &mut self.out);
            }
            if let Some(e) = refused {
                // MQTT 3.1.1 cannot say "refused" in a PUBACK: close instead.
                if self.codec.protocol == Protocol::V4 {
                    return Err(if e.is_full() {
                        SessionEnd::Quota(e)
                    } else {
                        SessionEnd::Storage(e)
                    });
                }
                tracing::warn!(client = %self.client_id, error = %e, "publish refused");
            }
        }
        Ok(())
    }

    async fn on_control(&mut self, packet: Inbound) -> Result<(), SessionEnd> {
        match packet {
            Inbound::Publish(_) => unreachable!("publishes are batched by on_bytes"),
            Inbound::PubAck(pkid) => {
                if let Some(Sent::Published { publish, .. }) = self.outgoing.get(&pkid) {
                    if publish.qos == 1 {
                        self.done(pkid);
                    }
                }
            }
            Inbound::PubRec(pkid) => {
                let mut durable = None;
                if let Some(sent) = self.outgoing.get_mut(&pkid) {
                    if let Sent::Published { publish, receipt } = sent {
                        if publish.qos == 2 {
                            let receipt = receipt.take();
                            durable = receipt.as_ref().and_then(|r| r.released(pkid));
                            *sent = Sent::Released { receipt };
                        }
                    }
                }
                match durable {
                    Some(durable) => self.releasing.push_back((pkid, durable)),
                    None => self.codec.write(Outbound::PubRel(pkid), &mut self.out),
                }
            }
            Inbound::PubComp(pkid) => {
                if let Some(Sent::Released { .. }) = self.outgoing.get(&pkid) {
                    self.done(pkid);
                }
            }
            Inbound::PubRel(pkid) => {
                self.qos2_received.remove(&pkid);
                self.codec.write(Outbound::PubComp(pkid), &mut self.out);
            }
            Inbound::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                let mut accepted = Vec::new();
                for (filter, qos) in filters {
                    if !topic::valid_filter(&filter) || filter.starts_with("$share/") {
                        tracing::warn!(client = %self.client_id, %filter, "subscription refused: invalid filter");
                        granted.push(Err(SubRefusal::InvalidFilter));
                    } else if !authz::may_subscribe(
                        &self.principal,
                        self.ctx.auth.edge_id(),
                        &filter,
                    ) {
                        tracing::warn!(client = %self.client_id, %filter, "subscription refused: not authorized");
                        self.ctx.metrics.authz_refused(1);
                        granted.push(Err(SubRefusal::NotAuthorized));
                    } else {
                        // Deliveries are at most QoS 1: granting less is allowed.
                        let q = qos.min(2);
                        granted.push(Ok(q));
                        accepted.push((filter, q));
                    }
                }
                self.codec
                    .write(Outbound::SubAck { pkid, granted }, &mut self.out);
                let devicebound = self.device_inbox().is_some_and(|inbox| {
                    accepted
                        .iter()
                        .any(|(f, _)| topic::matches(f, &format!("{inbox}/x")))
                });
                let retained = self.ctx.broker.subscribe(&self.client_id, accepted).await;
                for d in retained {
                    self.deliver(Delivery { retain: true, ..d });
                }
                if devicebound {
                    // Messages the cloud sent while the device was away.
                    self.ctx.c2d.push(&self.client_id).await;
                }
                // Module inputs that waited for a subscriber.
                self.ctx.inputs.push_all().await;
            }
            Inbound::Unsubscribe { pkid, filters } => {
                let count = filters.len();
                self.ctx.broker.unsubscribe(&self.client_id, filters).await;
                self.codec
                    .write(Outbound::UnsubAck { pkid, count }, &mut self.out);
            }
            Inbound::PingReq => self.codec.write(Outbound::PingResp, &mut self.out),
            Inbound::Disconnect { with_will } => {
                if !with_will {
                    self.will = None;
                }
                return Err(SessionEnd::Disconnect);
            }
        }
        Ok(())
    }

    /// `devices/{d}/messages/devicebound` when this session is child device
    /// `d` (cloud-to-device messages are for devices, not modules).
    fn device_inbox(&self) -> Option<String> {
        match &*self.principal {
            Principal::Identity(id, _) if id.module_id.is_none() => {
                Some(format!("devices/{}/messages/devicebound", id.device_id))
            }
            _ => None,
        }
    }

    /// Sends a message to this client (QoS 1 tracked until its PUBACK,
    /// QoS 2 until its PUBCOMP).
    fn deliver(&mut self, d: Delivery) {
        let mut p = Publish {
            topic: d.topic,
            payload: d.payload,
            qos: d.qos.min(2),
            retain: d.retain,
            dup: d.dup,
            pkid: 0,
        };
        if p.qos > 0 {
            p.pkid = self.alloc_pkid();
            let sent = Sent::Published {
                publish: p.clone(),
                receipt: d.receipt,
            };
            self.outgoing.insert(p.pkid, sent);
        } else if let Some(receipt) = d.receipt {
            receipt.acknowledged();
        }
        self.codec.write(Outbound::Publish(p), &mut self.out);
    }

    /// The client has the delivery `pkid` (its PUBACK, its PUBCOMP).
    fn done(&mut self, pkid: u16) {
        let receipt = match self.outgoing.remove(&pkid) {
            Some(Sent::Published { receipt, .. } | Sent::Released { receipt }) => receipt,
            None => None,
        };
        if let Some(receipt) = receipt {
            receipt.acknowledged();
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        let outgoing = &self.outgoing;
        // 65,535 unacknowledged deliveries cannot happen: the offline queue
        // and the delivery channel are far smaller.
        self.pkids
            .next(|id| outgoing.contains_key(&id))
            .unwrap_or(1)
    }

    /// Publishes the will when the client did not say goodbye, and detaches.
    async fn finish(mut self, end: &SessionEnd) {
        if let (Some(will), false) = (self.will.take(), matches!(end, SessionEnd::Shutdown)) {
            let router = &self.ctx.router;
            let publisher = self.client_id.clone();
            let Publish {
                topic,
                payload: body,
                ..
            } = *will;
            let now = crate::clock::now_ms();
            let will = Message::published(publisher, topic, body, will.qos, will.retain, now);
            let (local, upstream) = if router.upstream_bound(&will.topic) {
                (Vec::new(), vec![will])
            } else {
                (vec![will], Vec::new())
            };
            router.dispatch(local, upstream).await;
        }
        // Not done yet (in packet id order): a PUBLISH goes again, a
        // released QoS 2 delivery gets its PUBREL again.
        let sent = std::mem::take(&mut self.outgoing);
        let mut unacked = Vec::new();
        let mut released = Vec::new();
        for (pkid, s) in sent {
            match s {
                Sent::Published {
                    publish: p,
                    receipt,
                } => unacked.push(Delivery {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                    dup: p.dup,
                    receipt,
                }),
                Sent::Released { receipt } => released.push((pkid, receipt)),
            }
        }
        while let Some(d) = self.outbox.try_recv() {
            unacked.push(d);
        }
        self.ctx
            .broker
            .disconnect(&self.client_id, self.conn_id, unacked, released)
            .await;
    }
}
