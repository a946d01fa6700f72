//! A message as route conditions read it: its properties, system
//! properties and JSON body, the body parsed at most once and only when a
//! condition asks for it.

use std::cell::OnceCell;

use super::rules::Fields;
use crate::message::Message;

pub struct MessageFields<'a> {
    pub message: &'a Message,
    body: OnceCell<Option<serde_json::Value>>,
}

impl<'a> MessageFields<'a> {
    pub fn new(message: &'a Message) -> Self {
        Self {
            message,
            body: OnceCell::new(),
        }
    }
}

impl Fields for MessageFields<'_> {
    fn app_property(&self, name: &str) -> Option<&str> {
        let p = self.message.properties();
        p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn system_property(&self, name: &str) -> Option<&str> {
        let p = self.message.system_properties();
        p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn body_json(&self) -> Option<&serde_json::Value> {
        self.body
            .get_or_init(|| serde_json::from_slice(&self.message.body).ok())
            .as_ref()
    }
}
