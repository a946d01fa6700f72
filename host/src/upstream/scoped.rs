//! A link consumer whose filters follow the device scope: one subscription
//! (or more) per identity, replaced whenever the scope changes.
//!
//! Owns the consumer's view of the scope and setting its filters on the
//! link; what a consumer does with its messages is its own business
//! (`twins`, `methods`, `c2d`).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::link::{CloudMessage, ConsumerId, Link, LinkHandle};
use crate::auth::{Auth, Scope};

/// Cloud messages a consumer's channel holds before the link waits.
const CHANNEL: usize = 64;

/// A consumer registered on the link before it starts; once running, its
/// filters follow the scope ([`ScopedConsumer::follow`]).
pub struct ScopedConsumer {
    consumer: ConsumerId,
    pub messages: mpsc::Receiver<CloudMessage>,
}

impl ScopedConsumer {
    pub fn register(link: &mut Link) -> Self {
        let (consumer, messages) = link.consumer(CHANNEL);
        Self { consumer, messages }
    }

    /// Sets the filters from the scope in force and keeps them following it.
    pub async fn follow(
        &self,
        link: LinkHandle,
        auth: &Auth,
        filters: fn(&Scope) -> Vec<String>,
    ) -> ScopedFilters {
        ScopedFilters::new(link, self.consumer, auth, filters).await
    }
}

pub struct ScopedFilters {
    link: LinkHandle,
    consumer: ConsumerId,
    scope_rx: watch::Receiver<Option<Arc<Scope>>>,
    filters: fn(&Scope) -> Vec<String>,
    scope: Option<Arc<Scope>>,
}

impl ScopedFilters {
    /// Sets `consumer`'s filters from the scope in force (`filters` of it;
    /// none while there is no scope).
    async fn new(
        link: LinkHandle,
        consumer: ConsumerId,
        auth: &Auth,
        filters: fn(&Scope) -> Vec<String>,
    ) -> Self {
        let mut s = ScopedFilters {
            link,
            consumer,
            scope_rx: auth.watch(),
            filters,
            scope: None,
        };
        s.apply().await;
        s
    }

    /// Waits for the scope to change (cancel-safe: use it in `select!`,
    /// then call [`ScopedFilters::apply`]); false when it never will.
    pub async fn changed(&mut self) -> bool {
        self.scope_rx.changed().await.is_ok()
    }

    /// Takes the scope in force and sets the consumer's filters from it.
    pub async fn apply(&mut self) {
        self.scope = self.scope_rx.borrow_and_update().clone();
        let filters = self.scope.as_deref().map(self.filters).unwrap_or_default();
        self.link.set_filters(self.consumer, filters).await;
    }

    /// The scope the filters were set from.
    pub fn scope(&self) -> Option<&Scope> {
        self.scope.as_deref()
    }
}
