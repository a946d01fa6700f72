//! MQTT packet identifiers: the one allocator every connection uses.
//!
//! Owns only the cursor. Which ids are in use is the caller's state (its
//! in-flight table), asked through a closure, so the allocator costs two
//! bytes per connection however many ids are taken.

/// Hands out packet ids 1..=65535 in turn, skipping those in use.
#[derive(Debug, Clone)]
pub struct PacketIds {
    next: u16,
}

impl Default for PacketIds {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl PacketIds {
    /// The next id for which `in_use` is false, or `None` when all 65,535
    /// are taken.
    pub fn next(&mut self, in_use: impl Fn(u16) -> bool) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if !in_use(id) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_in_use_are_skipped_and_zero_is_never_given() {
        let mut ids = PacketIds::default();
        let mut taken = HashSet::new();
        taken.insert(1u16);
        for _ in 0..70_000 {
            let id = ids.next(|i| taken.contains(&i)).unwrap();
            assert_ne!(id, 0);
            assert_ne!(id, 1);
        }
    }

    #[test]
    fn a_full_table_gives_no_id_instead_of_spinning() {
        let mut ids = PacketIds::default();
        assert_eq!(ids.next(|_| true), None);
        assert_eq!(ids.next(|i| i != 500), Some(500));
    }
}
