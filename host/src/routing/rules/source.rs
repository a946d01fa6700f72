//! Route sources (`FROM ...`): which message source paths a route takes.
//!
//! Message sources are `/messages/devices/{d}`, `/messages/modules/{m}` and
//! `/messages/modules/{m}/outputs/{o}`. A pattern is one such path, or a
//! prefix ending in `/*` that matches itself and everything below it.

use std::fmt;

use super::error::RouteError;

/// A validated source pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePattern {
    text: String,
    /// For `.../*` patterns, the part before `/*`.
    prefix: Option<String>,
}

impl SourcePattern {
    /// Parses a pattern on its own; error columns are relative to `text`.
    pub fn parse(text: &str) -> Result<SourcePattern, RouteError> {
        validate(text).map_err(|(offset, message)| RouteError::at(offset + 1, message))?;
        Ok(Self::new_unchecked(text))
    }

    pub(crate) fn new_unchecked(text: &str) -> Self {
        Self {
            text: text.to_string(),
            prefix: text.strip_suffix("/*").map(str::to_string),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern ends in `/*`.
    pub fn is_wildcard(&self) -> bool {
        self.prefix.is_some()
    }

    /// Whether every message source matches (`/messages/*` or `/*`).
    pub fn matches_every_source(&self) -> bool {
        matches!(self.prefix.as_deref(), Some("/messages" | ""))
    }

    /// Whether a message from `source` (e.g. `/messages/modules/m1/outputs/o1`) is taken.
    pub fn matches(&self, source: &str) -> bool {
        match &self.prefix {
            None => source == self.text,
            Some(prefix) => source
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl fmt::Display for SourcePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An error inside a path: 0-based character offset and message.
pub(crate) type PathError = (usize, String);

/// The segments of a path that starts with `/`, each with the character
/// offset where it starts. Checks that segments are non-empty and have no
/// blanks; an empty segment is reported at the `/` before it.
pub(crate) fn segments(path: &str) -> Result<Vec<(usize, &str)>, PathError> {
    let mut out = Vec::new();
    let mut offset = 1;
    for segment in path.get(1..).unwrap_or_default().split('/') {
        if segment.is_empty() {
            return Err((offset - 1, "empty path segment".into()));
        }
        if let Some(i) = segment.chars().position(char::is_whitespace) {
            return Err((offset + i, "blank in a path".into()));
        }
        out.push((offset, segment));
        offset += segment.chars().count() + 1;
    }
    Ok(out)
}

/// Checks a source pattern's shape; see the module documentation.
pub(crate) fn validate(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err((0, "empty source pattern".into()));
    }
    if !path.starts_with('/') {
        return Err((
            0,
            "a source pattern must start with '/messages' (or be '/*')".into(),
        ));
    }
    let segs = segments(path)?;
    let last = segs.len() - 1;
    for (i, &(offset, seg)) in segs.iter().enumerate() {
        if seg.contains('*') && (seg != "*" || i != last) {
            let message = if seg == "*" {
                "'*' is only allowed as the last segment"
            } else {
                "'*' must be a whole segment"
            };
            return Err((offset, message.into()));
        }
    }
    // Where a missing segment would start.
    let end = path.chars().count();
    let names: Vec<&str> = segs.iter().map(|&(_, s)| s).collect();
    let at = |i: usize| segs.get(i).map_or(end, |&(offset, _)| offset);
    let fail = |offset: usize, message: &str| Err((offset, message.to_string()));
    match names.as_slice() {
        ["*"] | ["messages", "*"] => Ok(()),
        [first, ..] if *first != "messages" => fail(
            at(0),
            "a source pattern must start with '/messages' (or be '/*')",
        ),
        ["messages"] => fail(
            end,
            "expected '/*', '/devices/...' or '/modules/...' after '/messages'",
        ),
        ["messages", kind, ..] if *kind != "devices" && *kind != "modules" => {
            fail(at(1), "expected 'devices', 'modules' or '*'")
        }
        ["messages", "devices"] => fail(end, "expected a device id or '*' after 'devices'"),
        ["messages", "devices", _] | ["messages", "devices", _, "*"] => Ok(()),
        ["messages", "devices", _, ..] => fail(at(3), "only '/*' may follow a device id"),
        ["messages", "modules"] => fail(end, "expected a module id or '*' after 'modules'"),
        ["messages", "modules", _] | ["messages", "modules", _, "*"] => Ok(()),
        ["messages", "modules", _, "outputs"] => {
            fail(end, "expected an output name or '*' after 'outputs'")
        }
        ["messages", "modules", _, "outputs", _] => Ok(()),
        ["messages", "modules", _, "outputs", _, ..] => {
            fail(at(5), "unexpected segment after the output name")
        }
        _ => fail(at(3), "expected 'outputs' or '*' after the module id"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_widest_patterns_match_every_source() {
        for (text, every) in [
            ("/messages/*", true),
            ("/*", true),
            ("/messages/devices/*", false),
            ("/messages/modules/m1", false),
        ] {
            let p = SourcePattern::parse(text).unwrap();
            assert_eq!(p.matches_every_source(), every, "{text}");
            if every {
                assert!(
                    p.matches("/messages/devices/d1") && p.matches("/messages/modules/m/outputs/o")
                );
            }
        }
    }

    use super::*;

    fn pattern(text: &str) -> SourcePattern {
        SourcePattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn error(text: &str) -> (usize, String) {
        let e = SourcePattern::parse(text).unwrap_err();
        (e.position, e.message)
    }

    #[test]
    fn all_allowed_shapes_parse() {
        for text in [
            "/*",
            "/messages/*",
            "/messages/devices/*",
            "/messages/devices/d1",
            "/messages/devices/d1/*",
            "/messages/modules/*",
            "/messages/modules/m1",
            "/messages/modules/m1/*",
            "/messages/modules/m1/outputs/*",
            "/messages/modules/m1/outputs/o1",
            "/messages/devices/dé-v:1",
        ] {
            assert_eq!(pattern(text).as_str(), text);
            assert_eq!(pattern(text).to_string(), text);
        }
    }

    #[test]
    fn matching() {
        let sources = [
            "/messages/devices/d1",
            "/messages/devices/d10",
            "/messages/modules/m1",
            "/messages/modules/m1/outputs/o1",
            "/messages/modules/m1/outputs/o2",
            "/messages/modules/m2/outputs/o1",
        ];
        let cases: [(&str, [bool; 6]); 10] = [
            ("/*", [true; 6]),
            ("/messages/*", [true; 6]),
            (
                "/messages/devices/*",
                [true, true, false, false, false, false],
            ),
            (
                "/messages/devices/d1",
                [true, false, false, false, false, false],
            ),
            (
                "/messages/devices/d1/*",
                [true, false, false, false, false, false],
            ),
            (
                "/messages/modules/*",
                [false, false, true, true, true, true],
            ),
            (
                "/messages/modules/m1",
                [false, false, true, false, false, false],
            ),
            (
                "/messages/modules/m1/*",
                [false, false, true, true, true, false],
            ),
            (
                "/messages/modules/m1/outputs/*",
                [false, false, false, true, true, false],
            ),
            (
                "/messages/modules/m1/outputs/o1",
                [false, false, false, true, false, false],
            ),
        ];
        for (text, want) in cases {
            let p = pattern(text);
            for (source, want) in sources.iter().zip(want) {
                assert_eq!(p.matches(source), want, "{text} vs {source}");
            }
        }
        assert!(pattern("/messages/modules/m1/outputs/*").is_wildcard());
        assert!(!pattern("/messages/modules/m1").is_wildcard());
    }

    #[test]
    fn bad_patterns_point_at_the_offending_segment() {
        let cases = [
            ("", 1, "empty source pattern"),
            (
                "messages/*",
                1,
                "a source pattern must start with '/messages' (or be '/*')",
            ),
            (
                "/foo/*",
                2,
                "a source pattern must start with '/messages' (or be '/*')",
            ),
            (
                "/messages",
                10,
                "expected '/*', '/devices/...' or '/modules/...' after '/messages'",
            ),
            (
                "/messages/things/x",
                11,
                "expected 'devices', 'modules' or '*'",
            ),
            ("/messages//x", 10, "empty path segment"),
            ("/messages/devices/", 18, "empty path segment"),
            (
                "/messages/devices",
                18,
                "expected a device id or '*' after 'devices'",
            ),
            (
                "/messages/devices/d1/outputs/o1",
                22,
                "only '/*' may follow a device id",
            ),
            (
                "/messages/modules/m1/inputs/i",
                22,
                "expected 'outputs' or '*' after the module id",
            ),
            (
                "/messages/modules/m1/outputs",
                29,
                "expected an output name or '*' after 'outputs'",
            ),
            (
                "/messages/modules/m1/outputs/o/x",
                32,
                "unexpected segment after the output name",
            ),
            (
                "/messages/*/x",
                11,
                "'*' is only allowed as the last segment",
            ),
            ("/messages/modules/m*", 19, "'*' must be a whole segment"),
            ("/**", 2, "'*' must be a whole segment"),
            ("/", 1, "empty path segment"),
            ("/messages/devices/a b", 20, "blank in a path"),
        ];
        for (text, position, message) in cases {
            assert_eq!(error(text), (position, message.to_string()), "{text}");
        }
    }
}
