//! A session's outbox: the deliveries the broker hands one connection, at
//! most `capacity` waiting, and the broker's word that the connection is
//! over (its sender dropped: taken over by a newer connection, or the
//! broker gone).
//!
//! It allocates nothing while nothing waits and gives back what a burst
//! took, so an idle connection costs a few dozen bytes here (a tokio
//! channel holds a block of 32 slots from the start). One sender (the
//! broker), one receiver (the session).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::Delivery;

/// A drained queue with room for more than this many gives it back.
const KEEP: usize = 16;

/// An outbox for up to `capacity` waiting deliveries.
pub fn channel(capacity: usize) -> (OutboxSender, Outbox) {
    let shared = Arc::new(Shared {
        capacity,
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            sender: true,
        }),
    });
    (OutboxSender(shared.clone()), Outbox(shared))
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Delivery>,
    /// The session waiting for a delivery or for the end.
    waker: Option<Waker>,
    /// Whether the sender is still there.
    sender: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The broker's end.
pub struct OutboxSender(Arc<Shared>);

impl OutboxSender {
    /// Queues `delivery`; gives it back when the outbox is full. A session
    /// that is gone takes nothing more, but what waits for it stays until
    /// the broker, told of its end, takes it back ([`Self::take_back`]).
    pub fn try_send(&self, delivery: Delivery) -> Result<(), Delivery> {
        let mut state = self.0.lock();
        if state.queue.len() >= self.0.capacity {
            return Err(delivery);
        }
        state.queue.push_back(delivery);
        if let Some(waker) = state.waker.take() {
            drop(state);
            waker.wake();
        }
        Ok(())
    }

    /// What waits undelivered, taken back: once the session has said it is
    /// over, it reads nothing more, so whatever was queued meanwhile (before
    /// or after its end dropped) was never sent.
    pub fn take_back(&self) -> VecDeque<Delivery> {
        std::mem::take(&mut self.0.lock().queue)
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.sender = false;
        if let Some(waker) = state.waker.take() {
            drop(state);
            waker.wake();
        }
    }
}

/// The session's end.
pub struct Outbox(Arc<Shared>);

impl Outbox {
    /// The next delivery when `take`; `None` once the sender is gone and
    /// nothing more waits (told even when not `take`).
    pub async fn next(&mut self, take: bool) -> Option<Delivery> {
        poll_fn(|cx| self.poll_next(cx, take)).await
    }

    /// [`next`](Self::next), polled.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, take: bool) -> Poll<Option<Delivery>> {
        let mut state = self.0.lock();
        if take {
            if let Some(d) = pop(&mut state) {
                return Poll::Ready(Some(d));
            }
        }
        if !state.sender && (state.queue.is_empty() || !take) {
            return Poll::Ready(None);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next delivery; `None` once the sender is gone and nothing waits.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.next(true).await
    }

    /// The next delivery if one waits.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        pop(&mut self.0.lock())
    }
}

fn pop(state: &mut State) -> Option<Delivery> {
    let d = state.queue.pop_front()?;
    if state.queue.is_empty() && state.queue.capacity() > KEEP {
        state.queue = VecDeque::new();
    }
    Some(d)
}

// Dropping the session's end leaves what waits for the broker to take back
// (a session's end and the broker's last deliveries to it cross); it is
// dropped, each receipt telling its owner, once both ends are gone.

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str) -> Delivery {
        Delivery {
            topic: topic.into(),
            payload: bytes::Bytes::new(),
            qos: 1,
            retain: false,
            dup: false,
            receipt: None,
        }
    }

    #[tokio::test]
    async fn deliveries_come_out_in_order_up_to_the_capacity() {
        let (tx, mut rx) = channel(2);
        assert!(tx.try_send(delivery("a")).is_ok());
        assert!(tx.try_send(delivery("b")).is_ok());
        assert_eq!(tx.try_send(delivery("c")).unwrap_err().topic, "c", "full");
        assert_eq!(rx.recv().await.unwrap().topic, "a");
        assert_eq!(rx.try_recv().unwrap().topic, "b");
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_session_that_takes_nothing_still_hears_that_its_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        tx.try_send(delivery("a")).unwrap();
        let waiting = tokio::spawn(async move {
            let end = rx.next(false).await;
            (end.is_none(), rx)
        });
        tokio::task::yield_now().await;
        drop(tx);
        let (ended, mut rx) = waiting.await.unwrap();
        assert!(ended, "told the end while not taking");
        assert_eq!(
            rx.recv().await.unwrap().topic,
            "a",
            "what waited is still there"
        );
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_delivery() {
        let (tx, mut rx) = channel(4);
        let waiting = tokio::spawn(async move { rx.recv().await.map(|d| d.topic) });
        tokio::task::yield_now().await;
        tx.try_send(delivery("a")).unwrap();
        assert_eq!(waiting.await.unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn what_was_queued_as_the_session_ended_is_taken_back_not_lost() {
        let (tx, rx) = channel(4);
        tx.try_send(delivery("a")).unwrap();
        drop(rx);
        tx.try_send(delivery("b")).unwrap();
        let back: Vec<String> = tx.take_back().into_iter().map(|d| d.topic).collect();
        assert_eq!(back, ["a", "b"], "in order");
        assert!(tx.take_back().is_empty());
    }

    #[test]
    fn a_drained_burst_is_given_back() {
        let (tx, mut rx) = channel(1000);
        for i in 0..500 {
            tx.try_send(delivery(&i.to_string())).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.lock().queue.capacity(), 0);
    }
}
