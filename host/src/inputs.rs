//! Module inputs: what routes send to `BrokeredEndpoint("/modules/{m}/inputs/{i}")`,
//! kept durably per endpoint until the module acknowledges it, and
//! delivered at least once, in order, on the module's input topic
//! (`devices/{edge}/modules/{m}/inputs/{i}/{properties}`) whenever a client
//! subscribed to it is connected: while the module is away, and across a
//! hub restart, its messages wait.
//!
//! Owns the endpoints' mailboxes (the store's `module_inputs` keyspace
//! through [`Mailboxes`], recipient `{m}/{i}`, bounded per endpoint,
//! expired after the route's or the hub's time to live). The router
//! reserves a batch's messages in order and the sender's PUBACK waits until
//! they are durable. It does not route (the router does) nor speak MQTT.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerHandle;
use crate::mailbox::{Bounds, Fate, MailboxError, Mailboxes, Reach, Reservation, Setup};
use crate::metrics::{DropReason, Metrics};
use crate::store::{Record, Store, StoreError};

/// Messages and bytes one endpoint holds: the defaults of
/// `store.module_input_max_messages` and `store.module_input_max_bytes`.
pub const DEFAULT_BOUNDS: Bounds = Bounds {
    messages: 10_000,
    bytes: 16 << 20,
};

pub struct ModuleInputs {
    mailboxes: Arc<Mailboxes>,
    metrics: Arc<Metrics>,
}

/// Settles the modules' acknowledgements (see [`ModuleInputs::open`]).
pub struct Settler {
    inputs: Arc<ModuleInputs>,
    fates: mpsc::UnboundedReceiver<Fate>,
}

/// The recipient of an endpoint.
pub fn endpoint(module: &str, input: &str) -> String {
    format!("{module}/{input}")
}

impl ModuleInputs {
    /// Loads every stored message; the returned [`Settler`] must run.
    pub fn open(
        store: &Store,
        broker: BrokerHandle,
        ttl_ms: Arc<AtomicU64>,
        bounds: Bounds,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, Settler), StoreError> {
        let setup = Setup {
            keyspace: "module_inputs",
            reach: Reach::Subscribers,
            bounds,
            ttl_ms,
            metrics: metrics.clone(),
            gauge: Metrics::set_module_inputs_queued,
        };
        let (mailboxes, fates) = Mailboxes::open(store, broker, setup)?;
        let inputs = Arc::new(ModuleInputs { mailboxes, metrics });
        let settler = Settler {
            inputs: inputs.clone(),
            fates,
        };
        Ok((inputs, settler))
    }

    /// Takes a batch's messages (endpoint, record) in order; a message for
    /// a full endpoint is dropped, counted and logged. Store the result.
    pub fn reserve(&self, messages: Vec<(String, Record)>) -> Reservation {
        let mut reservation = self.mailboxes.reserve(messages);
        for refused in reservation.refused.drain(..) {
            self.metrics
                .messages_dropped(DropReason::ModuleInputFull, 1);
            tracing::warn!(error = %refused, "message for a module input dropped");
        }
        reservation
    }

    /// Makes a reservation durable, then delivers what its endpoints'
    /// modules can take now.
    pub async fn store(&self, reservation: Reservation) -> Result<(), MailboxError> {
        for endpoint in self.mailboxes.store(reservation).await? {
            self.mailboxes.push(&endpoint).await;
        }
        Ok(())
    }

    /// Delivers what waits for any endpoint (a client subscribed or came
    /// back).
    pub async fn push_all(&self) {
        for endpoint in self.mailboxes.recipients() {
            self.mailboxes.push(&endpoint).await;
        }
    }
}

impl Settler {
    /// Removes what modules acknowledged and marks lost deliveries to be
    /// sent again, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let fate = tokio::select! {
                _ = shutdown.cancelled() => return,
                f = self.fates.recv() => match f { Some(f) => f, None => return },
            };
            self.inputs.mailboxes.settle(fate).await;
        }
    }
}
