//! The plugin worker threads. Plugin calls are synchronous and may run up to
//! their deadline, so they never run on the async runtime: callers send a job
//! and await the answer. Every plugin runs on one worker, chosen by its name,
//! so a stateful plugin (a deduplicator) sees all its messages in one
//! instance, in order. Each worker keeps one warm instance per plugin and
//! batches jobs for the same batch filter into one call.
//!
//! Owns the instances; it does not load plugins (see `registry`).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use super::{CallFailure, Endpoint, Instance, Kind, Message, Plugin};
use crate::metrics::Metrics;

/// Most messages one batch-filter call takes.
const MAX_BATCH: usize = 256;

/// What the plugin said about one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    Filtered(Option<Message>),
    Routed(Vec<Endpoint>),
}

/// One answer per message of a job, in order, each with the message it
/// answers (handed back, so callers need no copy for their failure policy).
pub type Answers = Vec<(Message, Result<Outcome, CallFailure>)>;

/// The answers to a submitted job (an error when the pool has shut down).
pub type Pending = oneshot::Receiver<Answers>;

struct Job {
    plugin: Arc<Plugin>,
    messages: Vec<Message>,
    reply: oneshot::Sender<Answers>,
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

    /// Runs one message through `plugin` on its worker thread.
    pub async fn call(&self, plugin: Arc<Plugin>, m: Message) -> Result<Outcome, CallFailure> {
        match self.submit(plugin, vec![m]).await {
            Ok(mut answers) => answers.pop().map_or(Err(CallFailure::Closed), |(_, r)| r),
            Err(_) => Err(CallFailure::Closed),
        }
    }

    /// Queues `messages` for `plugin`'s worker (filtered or routed, as the
    /// plugin's world says); the answers come on the receiver, in order.
    pub fn submit(&self, plugin: Arc<Plugin>, messages: Vec<Message>) -> Pending {
        let (reply, rx) = oneshot::channel();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&plugin.name, &mut h);
        let worker = (std::hash::Hasher::finish(&h) % self.workers.len() as u64) as usize;
        let job = Job {
            plugin,
            messages,
            reply,
        };
        // A send fails only after shutdown; the dropped reply says so.
        let _ = self.workers[worker].send(job);
        rx
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
            if group[0].plugin.kind == Kind::BatchFilter {
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

    /// One answer per message: a batch filter gets them in one call (and,
    /// when that call fails, one call each, so only the message at fault
    /// fails); other plugins get one call per message.
    fn answer(
        &mut self,
        plugin: &Arc<Plugin>,
        messages: Vec<Message>,
        metrics: &Metrics,
    ) -> Answers {
        if plugin.kind == Kind::BatchFilter && messages.len() > 1 {
            if let Ok(results) = self.with_instance(plugin, |i| i.filter_batch(&messages)) {
                return messages
                    .into_iter()
                    .zip(results)
                    .map(|(m, r)| (m, Ok(Outcome::Filtered(r))))
                    .collect();
            }
        }
        messages
            .into_iter()
            .map(|m| {
                let r = self.one(plugin, &m, metrics);
                (m, r)
            })
            .collect()
    }

    fn one(
        &mut self,
        plugin: &Arc<Plugin>,
        m: &Message,
        metrics: &Metrics,
    ) -> Result<Outcome, CallFailure> {
        let r = if plugin.kind.is_filter() {
            self.with_instance(plugin, |i| i.filter(m))
                .map(Outcome::Filtered)
        } else {
            self.with_instance(plugin, |i| i.route(m))
                .map(Outcome::Routed)
        };
        if let Err(e) = &r {
            metrics.plugin_failed(&plugin.name);
            tracing::warn!(plugin = %plugin.name, version = %plugin.digest, error = %e, "plugin call failed; instance replaced");
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
