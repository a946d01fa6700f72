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

/// Most jobs one worker takes at once (and so the largest batch).
const MAX_BATCH: usize = 64;

/// What to do with a message.
#[derive(Debug)]
pub enum Work {
    Filter(Message),
    Route(Message),
}

/// What the plugin said.
#[derive(Debug, Clone)]
pub enum Outcome {
    Filtered(Option<Message>),
    Routed(Vec<Endpoint>),
}

/// The answer to a submitted job (an error when the pool has shut down).
pub type Pending = oneshot::Receiver<Result<Outcome, CallFailure>>;

struct Job {
    plugin: Arc<Plugin>,
    work: Work,
    reply: oneshot::Sender<Result<Outcome, CallFailure>>,
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

    /// Runs `work` through `plugin` on a worker thread.
    pub async fn call(&self, plugin: Arc<Plugin>, work: Work) -> Result<Outcome, CallFailure> {
        self.submit(plugin, work)
            .await
            .unwrap_or(Err(CallFailure::Closed))
    }

    /// Queues `work` for `plugin`'s worker; the answer comes on the receiver.
    pub fn submit(&self, plugin: Arc<Plugin>, work: Work) -> Pending {
        let (reply, rx) = oneshot::channel();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&plugin.name, &mut h);
        let worker = (std::hash::Hasher::finish(&h) % self.workers.len() as u64) as usize;
        self.workers[worker]
            .send(Job {
                plugin,
                work,
                reply,
            })
            .ok();
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
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut jobs = jobs.into_iter().peekable();
            while let Some(job) = jobs.next() {
                // Consecutive filter jobs for the same batch filter: one call.
                let mut group = vec![job];
                if group[0].plugin.kind == Kind::BatchFilter
                    && matches!(group[0].work, Work::Filter(_))
                {
                    while let Some(next) = jobs.next_if(|j| {
                        Arc::ptr_eq(&j.plugin, &group[0].plugin)
                            && matches!(j.work, Work::Filter(_))
                    }) {
                        group.push(next);
                    }
                }
                self.handle(group, metrics);
            }
        }
    }

    fn handle(&mut self, group: Vec<Job>, metrics: &Metrics) {
        let plugin = group[0].plugin.clone();
        metrics.plugin_calls(group.len() as u64);
        if group.len() > 1 {
            let (messages, replies): (Vec<Message>, Vec<_>) = group
                .into_iter()
                .map(|j| match j.work {
                    Work::Filter(m) => (m, j.reply),
                    Work::Route(_) => unreachable!("only filter jobs are grouped"),
                })
                .unzip();
            match self.with_instance(&plugin, |i| i.filter_batch(&messages)) {
                Ok(results) => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(Outcome::Filtered(r)));
                    }
                }
                Err(_) => {
                    // Find the culprit: one call per message, so one bad
                    // message does not fail the others.
                    for (m, reply) in messages.into_iter().zip(replies) {
                        let r = self.one(&plugin, Work::Filter(m), metrics);
                        let _ = reply.send(r);
                    }
                }
            }
            return;
        }
        let job = group.into_iter().next().expect("one job");
        let r = self.one(&plugin, job.work, metrics);
        let _ = job.reply.send(r);
    }

    fn one(
        &mut self,
        plugin: &Arc<Plugin>,
        work: Work,
        metrics: &Metrics,
    ) -> Result<Outcome, CallFailure> {
        let r = match work {
            Work::Filter(m) => self
                .with_instance(plugin, |i| i.filter(&m))
                .map(Outcome::Filtered),
            Work::Route(m) => self
                .with_instance(plugin, |i| i.route(&m))
                .map(Outcome::Routed),
        };
        if let Err(e) = &r {
            metrics.plugin_failed();
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
        let r = f(instance);
        if r.is_err() {
            self.instances.remove(&plugin.name);
        }
        r
    }
}
