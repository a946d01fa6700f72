//! What ends or checks a connection from outside its session: its
//! keepalive running out, the hub shutting down, a new device scope to
//! check the client against again.
//!
//! One task ([`Liveness::run`]) watches every open connection: a tick for
//! keepalives (only while a connection with a keepalive is open: an idle hub
//! is not woken four times a second for nothing), the shutdown token, the
//! auth scope. It raises a flag on a
//! connection's [`Heartbeat`], which its session waits on beside its socket
//! and outbox; a waiting connection thus holds no timer, no cancellation
//! future and no watch future of its own (10,000 idle connections cost
//! little). What a flag means for the session (a DISCONNECT, a check) is
//! the session's business, not this module's.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often keepalives are checked: a client past its keepalive is let
/// go within this much more.
pub const TICK: Duration = Duration::from_millis(250);

const SHUTDOWN: u8 = 1;
const KEEPALIVE: u8 = 2;
const SCOPE: u8 = 4;

/// What a session is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The hub is shutting down.
    Shutdown,
    /// Nothing came from the client for its keepalive (1.5 times the one it
    /// asked for).
    KeepAlive,
    /// A new scope applies: check the client against it again.
    ScopeChanged,
}

/// Every open connection's heartbeat, and the task that watches them.
pub struct Liveness {
    beats: Mutex<Vec<Weak<Heartbeat>>>,
    shut_down: AtomicBool,
    epoch: Instant,
    /// Told when a connection with a keepalive opens: the tick starts.
    opened: Notify,
    /// Keepalive checks so far.
    #[cfg(test)]
    checks: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            beats: Mutex::new(Vec::new()),
            shut_down: AtomicBool::new(false),
            epoch: Instant::now(),
            opened: Notify::new(),
            #[cfg(test)]
            checks: AtomicU64::new(0),
        }
    }
}

/// One connection's: when its client was last heard, and the flags raised
/// for it.
pub struct Heartbeat {
    flags: AtomicU8,
    /// Milliseconds since the [`Liveness`]'s epoch.
    last_heard: AtomicU64,
    /// 0: no keepalive.
    keep_alive_ms: u64,
    waker: AtomicWaker,
}

impl Liveness {
    fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.epoch).as_millis() as u64
    }

    /// A heartbeat for a new connection, heard now. Registered after the
    /// hub began shutting down, it says so at once.
    pub fn register(&self, keep_alive: Option<Duration>) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat {
            flags: AtomicU8::new(0),
            last_heard: AtomicU64::new(self.now_ms()),
            keep_alive_ms: keep_alive.map_or(0, |k| (k.as_millis() as u64).max(1)),
            waker: AtomicWaker::new(),
        });
        let mut beats = self.lock();
        if self.shut_down.load(Ordering::Acquire) {
            beat.raise(SHUTDOWN);
        }
        // Without a tick, connections without a keepalive are forgotten
        // here, whenever the list doubles.
        if beats.len() >= 64 && beats.len().is_power_of_two() {
            beats.retain(|w| w.strong_count() > 0);
        }
        beats.push(Arc::downgrade(&beat));
        drop(beats);
        if beat.keep_alive_ms > 0 {
            // A permit is kept if the task is not waiting: never missed.
            self.opened.notify_one();
        }
        beat
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Heartbeat>>> {
        // Nothing panics while holding the lock; a poisoned one is whole.
        self.beats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises `flag` on every open connection (and forgets closed ones).
    fn raise_all(&self, flag: u8) {
        self.lock().retain(|w| match w.upgrade() {
            Some(beat) => {
                beat.raise(flag);
                true
            }
            None => false,
        });
    }

    /// Raises the keepalive flag of every connection not heard from for
    /// its keepalive (and forgets closed ones). Whether a connection with a
    /// keepalive is still open (the tick goes on).
    fn check_keepalives(&self) -> bool {
        #[cfg(test)]
        self.checks.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let mut watched = false;
        self.lock().retain(|w| match w.upgrade() {
            Some(beat) => {
                let heard = beat.last_heard.load(Ordering::Relaxed);
                if beat.keep_alive_ms > 0 {
                    watched = true;
                    if now.saturating_sub(heard) > beat.keep_alive_ms {
                        beat.raise(KEEPALIVE);
                    }
                }
                true
            }
            None => false,
        });
        watched
    }

    /// Open connections (for tests and the log).
    pub fn open(&self) -> usize {
        self.lock().iter().filter(|w| w.strong_count() > 0).count()
    }

    /// Watches every connection until `shutdown`, then tells them all.
    pub async fn run(
        self: Arc<Self>,
        mut scope: watch::Receiver<Option<Arc<crate::auth::Scope>>>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticking = false;
        let mut scope_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick(), if ticking => ticking = self.check_keepalives(),
                _ = self.opened.notified(), if !ticking => {
                    ticking = true;
                    tick.reset();
                }
                changed = scope.changed(), if scope_open => match changed {
                    Ok(()) => self.raise_all(SCOPE),
                    Err(_) => scope_open = false,
                },
            }
        }
        // Under the lock: a connection registered from now on is told at once.
        let mut beats = self.lock();
        self.shut_down.store(true, Ordering::Release);
        for beat in beats.iter().filter_map(Weak::upgrade) {
            beat.raise(SHUTDOWN);
        }
        beats.retain(|w| w.strong_count() > 0);
    }
}

impl Heartbeat {
    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The client was heard from (its keepalive starts again).
    pub fn heard(&self, liveness: &Liveness) {
        self.last_heard.store(liveness.now_ms(), Ordering::Relaxed);
    }

    /// The next signal: a shutdown or an expired keepalive is told every
    /// time it is asked for (the session ends on it), a scope change once.
    pub async fn signal(&self) -> Signal {
        poll_fn(|cx| self.poll_signal(cx)).await
    }

    /// [`signal`](Self::signal), polled.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.waker.register(cx.waker());
        match self.take() {
            Some(s) => Poll::Ready(s),
            None => Poll::Pending,
        }
    }

    fn take(&self) -> Option<Signal> {
        let flags = self.flags.load(Ordering::Acquire);
        if flags & SHUTDOWN != 0 {
            Some(Signal::Shutdown)
        } else if flags & KEEPALIVE != 0 {
            Some(Signal::KeepAlive)
        } else if flags & SCOPE != 0 {
            self.flags.fetch_and(!SCOPE, Ordering::AcqRel);
            Some(Signal::ScopeChanged)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watching() -> (
        Arc<Liveness>,
        watch::Sender<Option<Arc<crate::auth::Scope>>>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let liveness = Arc::new(Liveness::default());
        let (scope_tx, scope_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(liveness.clone().run(scope_rx, shutdown.clone()));
        (liveness, scope_tx, shutdown, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_not_heard_from_for_its_keepalive_is_told_within_a_tick() {
        let (liveness, _scope, _shutdown, _task) = watching();
        let beat = liveness.register(Some(Duration::from_secs(3)));
        let start = Instant::now();
        assert_eq!(beat.signal().await, Signal::KeepAlive);
        let waited = start.elapsed();
        assert!(
            waited > Duration::from_secs(3) && waited <= Duration::from_secs(3) + 2 * TICK,
            "told after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_heard_from_keeps_its_connection() {
        let (liveness, _scope, _shutdown, _task) = watching();
        let beat = liveness.register(Some(Duration::from_secs(3)));
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            beat.heard(&liveness);
        }
        let quiet = tokio::time::timeout(Duration::from_secs(2), beat.signal()).await;
        assert!(quiet.is_err(), "told {quiet:?} though heard from every 2 s");
        assert_eq!(beat.signal().await, Signal::KeepAlive, "then quiet for 3 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_without_keepalive_is_never_told_to_go() {
        let (liveness, _scope, _shutdown, _task) = watching();
        let beat = liveness.register(None);
        let told = tokio::time::timeout(Duration::from_secs(3600), beat.signal()).await;
        assert!(told.is_err(), "told {told:?}");
    }

    #[tokio::test]
    async fn a_new_scope_is_told_once_to_every_open_connection() {
        let (liveness, scope, _shutdown, _task) = watching();
        let beats: Vec<_> = (0..3).map(|_| liveness.register(None)).collect();
        scope.send(None).unwrap();
        for beat in &beats {
            assert_eq!(beat.signal().await, Signal::ScopeChanged);
            let again = tokio::time::timeout(Duration::from_millis(50), beat.signal()).await;
            assert!(again.is_err(), "told twice: {again:?}");
        }
    }

    #[tokio::test]
    async fn shutdown_is_told_to_open_connections_and_to_any_opened_after_it() {
        let (liveness, _scope, shutdown, task) = watching();
        let open = liveness.register(None);
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(open.signal().await, Signal::Shutdown);
        assert_eq!(open.signal().await, Signal::Shutdown, "told every time");
        let late = liveness.register(None);
        assert_eq!(late.signal().await, Signal::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tick_sleeps_while_no_connection_has_a_keepalive_and_wakes_for_one() {
        let (liveness, _scope, _shutdown, _task) = watching();
        let _without = liveness.register(None);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(liveness.checks.load(Ordering::Relaxed), 0, "an hour idle");
        let beat = liveness.register(Some(Duration::from_secs(3)));
        let start = Instant::now();
        assert_eq!(beat.signal().await, Signal::KeepAlive);
        assert!(start.elapsed() <= Duration::from_secs(3) + 2 * TICK);
        drop(beat);
        tokio::time::sleep(2 * TICK).await;
        let checks = liveness.checks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            liveness.checks.load(Ordering::Relaxed),
            checks,
            "asleep again once the last connection with a keepalive closed"
        );
    }

    #[test]
    fn connections_without_a_keepalive_are_forgotten_without_a_tick() {
        let liveness = Liveness::default();
        for _ in 0..1000 {
            drop(liveness.register(None));
        }
        let kept = liveness.register(None);
        assert!(
            liveness.lock().len() <= 128,
            "{} kept",
            liveness.lock().len()
        );
        assert_eq!(liveness.open(), 1);
        drop(kept);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_connections_are_forgotten() {
        let (liveness, _scope, _shutdown, _task) = watching();
        let kept = liveness.register(Some(Duration::from_secs(60)));
        drop(liveness.register(Some(Duration::from_secs(60))));
        tokio::time::sleep(2 * TICK).await;
        assert_eq!(liveness.lock().len(), 1);
        assert_eq!(liveness.open(), 1);
        drop(kept);
    }
}
