//! The plugin worker threads. Plugin calls are synchronous and may run up to
//! their deadline, so they never run on the async runtime: callers send a job
//! and await the answer. Every plugin runs on one worker, chosen by its name,
//! so a stateful plugin (a deduplicator) sees all its messages in one
//! instance, in order. Each worker keeps one warm instance per plugin and
//! batches jobs for the same batch or view filter into one call. Jobs carry
//! the hub's messages; a worker converts them (`boundary`) only for the
//! worlds that take records, so a view filter's messages are never copied
//! whole.
//!
//! Owns the instances; it does not load plugins (see `registry`).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use super::boundary::{self, Outcome, Verdict, Verdicts};
use super::{bindings, CallFailure, Instance, Kind, Plugin, ViewVerdict};
use crate::message::Message;
use crate::metrics::Metrics;

/// Most messages one batch-filter or view-filter call takes.
const MAX_BATCH: usize = 256;

struct Job {
    plugin: Arc<Plugin>,
    messages: Vec<Message>,
    reply: oneshot::Sender<Verdicts>,
}

/// A handle to the workers; cheap to clone. The workers end when the last
/// handle is dropped.
#[derive(Clone)]
pub struct PluginPool {
    workers: Arc<[Sender<Job>]>,
}

impl PluginPool {
    /// Starts `workers` threads. Join the handles after dropping every pool handle.
    pub fn start(workers: usize, metrics: Arc<Metrics>) -> (PluginPool, Vec<JoinHandle<()>>) {
        let mut senders = Vec::new();
        let handles = (0..workers.max(1))
            .map(|i| {
                let (tx, rx) = crossbeam_channel::unbounded();
                senders.push(tx);
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name(format!("plugin-{i}"))
                    .spawn(move || Worker::default().run(rx, &metrics))
                    .expect("spawn plugin worker")
            })
            .collect();
        (
            PluginPool {
                workers: senders.into(),
            },
            handles,
        )
    }

    /// Hands `messages` to `plugin`'s worker now (filtered or routed, as
    /// the plugin's world says); the verdicts come, in order, each with the
    /// message it answers, when the returned future is awaited. Fewer
    /// verdicts than messages means the worker died before answering the
    /// rest.
    pub fn submit(
        &self,
        plugin: Arc<Plugin>,
        messages: Vec<Message>,
    ) -> impl std::future::Future<Output = Verdicts> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&plugin.name, &mut h);
        let worker = (std::hash::Hasher::finish(&h) % self.workers.len() as u64) as usize;
        let job = Job {
            plugin,
            messages,
            reply,
        };
        // A send fails only after shutdown; the dropped reply says so, as
        // it does when a worker dies.
        let _ = self.workers[worker].send(job);
        async move { rx.await.unwrap_or_default() }
    }
}

#[derive(Default)]
struct Worker {
    /// One warm instance per plugin name.
    instances: HashMap<String, Instance>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>, metrics: &Metrics) {
        let mut waiting = std::collections::VecDeque::new();
        loop {
            let job = match waiting.pop_front() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            // Jobs waiting for the same batch filter join this one's call.
            let mut group = vec![job];
            if matches!(group[0].plugin.kind, Kind::BatchFilter | Kind::ViewFilter) {
                let mut size = group[0].messages.len();
                while size < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) if Arc::ptr_eq(&j.plugin, &group[0].plugin) => {
                            size += j.messages.len();
                            group.push(j);
                        }
                        Ok(j) => {
                            waiting.push_back(j);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            self.handle(group, metrics);
        }
    }

    fn handle(&mut self, group: Vec<Job>, metrics: &Metrics) {
        let plugin = group[0].plugin.clone();
        let sizes: Vec<usize> = group.iter().map(|j| j.messages.len()).collect();
        let (messages, replies): (Vec<Vec<Message>>, Vec<_>) =
            group.into_iter().map(|j| (j.messages, j.reply)).unzip();
        let messages: Vec<Message> = messages.into_iter().flatten().collect();
        let n = messages.len() as u64;
        metrics.plugin_calls(n);
        let started = std::time::Instant::now();
        let answers = self.answer(&plugin, messages, metrics);
        if n > 0 {
            let each = started.elapsed() / u32::try_from(n).unwrap_or(u32::MAX);
            metrics.plugin_took(&plugin.name, each, n);
        }
        let mut answers = answers.into_iter();
        for (reply, n) in replies.into_iter().zip(sizes) {
            let _ = reply.send(answers.by_ref().take(n).collect());
        }
    }

    /// One verdict per message: a batch or view filter gets them in one
    /// call (and, when that call fails, one call each, so only the message
    /// at fault fails); other plugins get one call per message.
    fn answer(
        &mut self,
        plugin: &Arc<Plugin>,
        messages: Vec<Message>,
        metrics: &Metrics,
    ) -> Verdicts {
        if plugin.kind == Kind::ViewFilter {
            return self.views(plugin, messages, metrics);
        }
        if plugin.kind == Kind::BatchFilter && messages.len() > 1 {
            let records: Vec<_> = messages.iter().map(bindings::Message::from).collect();
            if let Ok(results) = self.with_instance(plugin, |i| i.filter_batch(&records)) {
                return messages
                    .into_iter()
                    .zip(results)
                    .map(|(m, r)| {
                        let v = boundary::verdict(Outcome::Filtered(r), &m);
                        (m, Ok(v))
                    })
                    .collect();
            }
        }
        messages
            .into_iter()
            .map(|m| {
                let r = self.one(plugin, &m, metrics);
                let r = r.map(|outcome| boundary::verdict(outcome, &m));
                (m, r)
            })
            .collect()
    }

    /// A view filter's verdicts: the whole batch in one call, then, if that
    /// call failed, one call per message.
    fn views(
        &mut self,
        plugin: &Arc<Plugin>,
        messages: Vec<Message>,
        metrics: &Metrics,
    ) -> Verdicts {
        let (messages, r) = self.lend(plugin, messages);
        match r {
            Ok(verdicts) => return messages.into_iter().zip(verdicts).map(viewed).collect(),
            // One message: the failure is its own, with no second call.
            Err(e) if messages.len() == 1 => {
                failed(plugin, &e, metrics);
                return messages.into_iter().map(|m| (m, Err(e.clone()))).collect();
            }
            Err(_) => {}
        }
        let mut answers = Vec::with_capacity(messages.len());
        for m in messages {
            let (mut m, r) = self.lend(plugin, vec![m]);
            // None: the host panicked with it lent; it goes unanswered.
            let Some(m) = m.pop() else { continue };
            match r {
                Ok(mut v) => answers.push(viewed((m, v.pop().expect("checked: one verdict")))),
                Err(e) => {
                    failed(plugin, &e, metrics);
                    answers.push((m, Err(e)));
                }
            }
        }
        answers
    }

    fn lend(
        &mut self,
        plugin: &Arc<Plugin>,
        messages: Vec<Message>,
    ) -> (Vec<Message>, Result<Vec<ViewVerdict>, CallFailure>) {
        let mut held = Some(messages);
        let r = self.with_instance(plugin, |i| {
            let (ms, r) = i.filter_views(held.take().unwrap_or_default());
            held = Some(ms);
            r
        });
        // Held unless the host panicked while they were lent.
        (held.unwrap_or_default(), r)
    }

    fn one(
        &mut self,
        plugin: &Arc<Plugin>,
        m: &Message,
        metrics: &Metrics,
    ) -> Result<Outcome, CallFailure> {
        let record = bindings::Message::from(m);
        let r = if plugin.kind.is_filter() {
            self.with_instance(plugin, |i| i.filter(&record))
                .map(Outcome::Filtered)
        } else {
            self.with_instance(plugin, |i| i.route(&record))
                .map(Outcome::Routed)
        };
        if let Err(e) = &r {
            failed(plugin, e, metrics);
        }
        r
    }
    /// Runs `f` on this worker's instance of `plugin` (of exactly its
    /// generation), creating it when needed and dropping it when `f` fails.
    fn with_instance<T>(
        &mut self,
        plugin: &Plugin,
        f: impl FnOnce(&mut Instance) -> Result<T, CallFailure>,
    ) -> Result<T, CallFailure> {
        let fresh = match self.instances.get(&plugin.name) {
            Some(i) => i.generation != plugin.generation,
            None => true,
        };
        if fresh {
            let instance = plugin
                .instantiate()
                .map_err(|e| CallFailure::Start(e.to_string()))?;
            self.instances.insert(plugin.name.clone(), instance);
        }
        let instance = self.instances.get_mut(&plugin.name).expect("just inserted");
        // A panic in the host while running a guest fails this call only;
        // the messages stay with the caller.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(instance)))
            .unwrap_or_else(|_| Err(CallFailure::Trap("the plugin host panicked".into())));
        if r.is_err() {
            self.instances.remove(&plugin.name);
        }
        r
    }
}

fn failed(plugin: &Plugin, e: &CallFailure, metrics: &Metrics) {
    metrics.plugin_failed(&plugin.name);
    tracing::warn!(plugin = %plugin.name, version = %plugin.digest, error = %e, "plugin call failed; instance replaced");
}

/// A view filter's verdict as the hub's: a kept message goes on as it was.
fn viewed((m, v): (Message, ViewVerdict)) -> (Message, Result<Verdict, CallFailure>) {
    let v = match v {
        ViewVerdict::Keep => Verdict::Kept,
        ViewVerdict::Drop => Verdict::Filtered(None),
        ViewVerdict::Replace(r) => boundary::verdict(Outcome::Filtered(Some(r)), &m),
    };
    (m, Ok(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_view_filter_s_verdicts_become_the_hub_s_and_a_kept_message_is_not_rebuilt() {
        let m = Message::published(
            Arc::from("d1"),
            "devices/d1/messages/events/a=1".into(),
            Bytes::from_static(b"{}"),
            1,
            false,
            5,
        );
        assert!(matches!(
            viewed((m.clone(), ViewVerdict::Keep)).1,
            Ok(Verdict::Kept)
        ));
        assert!(matches!(
            viewed((m.clone(), ViewVerdict::Drop)).1,
            Ok(Verdict::Filtered(None))
        ));
        let mut record = bindings::Message::from(&m);
        record.properties.push(("alert".into(), "true".into()));
        let (input, out) = viewed((m.clone(), ViewVerdict::Replace(record)));
        let Ok(Verdict::Filtered(Some(out))) = out else {
            panic!("a replacement passes the new message")
        };
        assert_eq!(
            out.properties(),
            [("a".into(), "1".into()), ("alert".into(), "true".into())]
        );
        assert_eq!(
            (out.qos, out.publisher()),
            (1, "d1"),
            "the input's QoS and publisher stay"
        );
        assert_eq!(
            input.topic, m.topic,
            "the input comes back for the failure policy"
        );
    }
}
