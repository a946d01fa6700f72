//! The route table in force, shared by every session's router and swapped
//! atomically when the config or the hub twin brings a new one. A message
//! is routed by the table it found when its batch started.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::rules::RouteTable;

/// The live route table; `None` means no routes are configured and every
/// upstream-bound message goes upstream.
#[derive(Clone, Default)]
pub struct Routes {
    table: Arc<ArcSwapOption<RouteTable>>,
}

impl Routes {
    pub fn new(table: Option<RouteTable>) -> Self {
        Self {
            table: Arc::new(ArcSwapOption::from(table.map(Arc::new))),
        }
    }

    /// The table in force now.
    pub fn table(&self) -> Option<Arc<RouteTable>> {
        self.table.load_full()
    }

    /// Puts `table` in force for every batch routed from now on.
    pub fn set(&self, table: Option<RouteTable>) {
        self.table.store(table.map(Arc::new));
    }
}
