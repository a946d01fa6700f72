//! MQTT topic names and filters: validation and wildcard matching.
//!
//! Pure functions, shared by sessions, the local broker, routing, auth and
//! the upstream link; owns no state and imports nothing of the hub.

/// A topic a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_name(topic: &str) -> bool {
    check_name(topic, MAX_LEN).is_ok()
}

/// The longest topic MQTT can carry (its length is a 16-bit number).
pub const MAX_LEN: usize = 65_535;

/// Why a topic cannot be published (or stored to be published).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopic {
    #[error("the topic is empty")]
    Empty,
    #[error("the topic contains a NUL character")]
    Nul,
    #[error("the topic contains a wildcard (+ or #)")]
    Wildcard,
    #[error("the topic is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
}

impl InvalidTopic {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidTopic::Empty => "empty",
            InvalidTopic::Nul => "nul",
            InvalidTopic::Wildcard => "wildcard",
            InvalidTopic::TooLong { .. } => "too_long",
        }
    }
}

/// Checks a topic name against MQTT's rules and a length limit (at most
/// [`MAX_LEN`] whatever `max_len` says).
pub fn check_name(topic: &str, max_len: usize) -> Result<(), InvalidTopic> {
    let max = max_len.min(MAX_LEN);
    if topic.is_empty() {
        Err(InvalidTopic::Empty)
    } else if topic.len() > max {
        Err(InvalidTopic::TooLong {
            len: topic.len(),
            max,
        })
    } else if topic.contains('\0') {
        Err(InvalidTopic::Nul)
    } else if topic.contains(['+', '#']) {
        Err(InvalidTopic::Wildcard)
    } else {
        Ok(())
    }
}

/// A subscription filter: `+` fills a whole level, `#` only as the last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter` (both assumed valid). Topics starting
/// with `$` are not matched by a leading wildcard, as the spec says.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_levels() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn system_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn filters_are_validated() {
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(valid_name("a/b"));
        assert!(!valid_name("a/+"));
    }

    #[test]
    fn every_unpublishable_topic_is_named_for_what_is_wrong() {
        assert_eq!(check_name("", 10), Err(InvalidTopic::Empty));
        assert_eq!(check_name("a\0b", 10), Err(InvalidTopic::Nul));
        assert_eq!(check_name("a/#", 10), Err(InvalidTopic::Wildcard));
        assert_eq!(check_name("a/+/b", 10), Err(InvalidTopic::Wildcard));
        assert_eq!(
            check_name("abcdefghijk", 10),
            Err(InvalidTopic::TooLong { len: 11, max: 10 })
        );
        let huge = "x".repeat(70_000);
        assert_eq!(
            check_name(&huge, usize::MAX),
            Err(InvalidTopic::TooLong {
                len: 70_000,
                max: MAX_LEN
            }),
            "no limit goes past what MQTT can carry"
        );
        assert_eq!(check_name("devices/d1/messages/events/a=b", 100), Ok(()));
    }
}
