//! Hands results from a plain thread (the store writer) to the hub's
//! runtime through the runtime's I/O driver.
//!
//! Completing a tokio channel from a thread outside the runtime wakes the
//! waiting task remotely: tokio unparks an idle worker to look for it, and
//! the worker that finds it unparks one more to keep looking, which finds
//! nothing. At a light load that was two wake-ups per acknowledged message
//! spent on finding one task. A [`Doorbell`] queues what the thread hands
//! over and writes one byte to a socket the runtime polls: the worker
//! parked on the I/O driver wakes, one task delivers everything queued, and
//! the tasks it wakes run on that worker.
//!
//! Owns the queue, the socket pair and the delivering task, which ends once
//! the doorbell is dropped and everything rung is delivered. It does not
//! know what it carries. Outside a runtime (a command-line call) it
//! delivers on the ringing thread.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// The ringing side: cheap to move to the thread that rings it.
pub struct Doorbell<T: Send + 'static> {
    deliver: fn(T),
    /// `None`: no runtime to hand to; delivered on the ringing thread.
    bell: Option<(Arc<Mutex<Vec<T>>>, UnixStream)>,
}

impl<T: Send + 'static> Doorbell<T> {
    /// A doorbell whose items are handed to `deliver` on the current
    /// runtime (on the ringing thread when there is none).
    pub fn new(deliver: fn(T)) -> Self {
        Self {
            deliver,
            bell: tokio::runtime::Handle::try_current()
                .ok()
                .and_then(|runtime| open(&runtime, deliver).ok()),
        }
    }

    /// Queues `items` for delivery, in order after everything rung before.
    pub fn ring(&self, items: impl IntoIterator<Item = T>) {
        let Some((waiting, bell)) = &self.bell else {
            items.into_iter().for_each(self.deliver);
            return;
        };
        waiting.lock().expect("doorbell queue").extend(items);
        // A full socket means a ring not yet heard: this one can go.
        let _ = (&*bell).write(&[1]);
    }
}

fn open<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    deliver: fn(T),
) -> std::io::Result<(Arc<Mutex<Vec<T>>>, UnixStream)> {
    let (bell, heard) = UnixStream::pair()?;
    bell.set_nonblocking(true)?;
    heard.set_nonblocking(true)?;
    let heard = {
        let _entered = runtime.enter();
        tokio::net::UnixStream::from_std(heard)?
    };
    let waiting = Arc::new(Mutex::new(Vec::new()));
    let queue = waiting.clone();
    runtime.spawn(async move {
        let mut rings = [0u8; 256];
        loop {
            if heard.readable().await.is_err() {
                return;
            }
            // Take the rings first: an item queued after this still rings
            // again, so nothing waits for a ring that was already read.
            let closed = loop {
                match heard.try_read(&mut rings) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            let items = std::mem::take(&mut *queue.lock().expect("doorbell queue"));
            items.into_iter().for_each(deliver);
            if closed {
                return;
            }
        }
    });
    Ok((waiting, bell))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Sends the item's number and whether it was delivered on a runtime.
    fn to_channel((tx, i): (mpsc::UnboundedSender<(u32, bool)>, u32)) {
        let _ = tx.send((i, tokio::runtime::Handle::try_current().is_ok()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_thread_rings_reaches_the_runtime_in_order_and_the_task_ends_with_the_bell() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bell = Doorbell::new(to_channel);
        assert!(bell.bell.is_some(), "a runtime is there to hand to");
        let thread = std::thread::spawn(move || {
            for chunk in 0..100u32 {
                bell.ring((0..100).map(|i| (tx.clone(), chunk * 100 + i)));
            }
            // The bell is dropped here: the task delivers the rest and ends.
        });
        for expected in 0..10_000u32 {
            let (i, on_runtime) = rx.recv().await.expect("every item delivered");
            assert_eq!(i, expected, "in the order rung");
            assert!(on_runtime, "delivered by the runtime's task");
        }
        thread.join().unwrap();
        assert!(
            rx.recv().await.is_none(),
            "nothing more, and no sender kept"
        );
    }

    #[tokio::test]
    async fn rings_while_the_runtime_is_busy_fill_the_socket_and_lose_nothing() {
        // A current-thread runtime runs nothing while this test blocks it:
        // the rings pile up past the socket's buffer, and are all heard
        // once the runtime runs again.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bell = Doorbell::new(to_channel);
        let thread = std::thread::spawn(move || {
            for i in 0..300_000u32 {
                bell.ring([(tx.clone(), i)]);
            }
            bell
        });
        let bell = thread.join().unwrap();
        let mut n = 0u32;
        while n < 300_000 {
            let (i, _) = rx.recv().await.expect("every item delivered");
            assert_eq!(i, n);
            n += 1;
        }
        drop(bell);
        assert!(rx.recv().await.is_none());
    }

    #[test]
    fn without_a_runtime_it_delivers_on_the_ringing_thread() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bell = Doorbell::new(to_channel);
        assert!(bell.bell.is_none());
        bell.ring([(tx.clone(), 7), (tx, 8)]);
        assert_eq!(rx.try_recv().unwrap(), (7, false));
        assert_eq!(rx.try_recv().unwrap(), (8, false));
    }
}
