//! Route errors: what is wrong with a route and where in its text.

use std::fmt;

/// An invalid route, pointing at a 1-based character column of the route text.
///
/// `position` 0 means the error is not about the route text itself (a bad
/// `priority` or an unknown key in a JSON route entry, for example).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RouteError {
    pub position: usize,
    pub message: String,
}

impl RouteError {
    pub(crate) fn at(position: usize, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
        }
    }

    /// The line of `text` holding the error, with a caret under its column.
    /// Returns `text` unchanged when the error has no position.
    pub fn render(&self, text: &str) -> String {
        if self.position == 0 {
            return text.to_string();
        }
        let chars: Vec<char> = text.chars().collect();
        let at = (self.position - 1).min(chars.len());
        let start = chars[..at]
            .iter()
            .rposition(|&c| c == '\n')
            .map_or(0, |i| i + 1);
        let end = chars[at..]
            .iter()
            .position(|&c| c == '\n')
            .map_or(chars.len(), |i| at + i);
        let line: String = chars[start..end].iter().collect();
        // Keep tabs so that the caret lines up however they are displayed.
        let pad: String = chars[start..at]
            .iter()
            .map(|&c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        format!("{}\n{pad}^", line.trim_end_matches('\r'))
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.position == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "column {}: {}", self.position, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_position() {
        let e = RouteError::at(23, "expected INTO, found 'INT'");
        assert_eq!(e.to_string(), "column 23: expected INTO, found 'INT'");
        let e = RouteError::at(0, "priority must be 0..=9");
        assert_eq!(e.to_string(), "priority must be 0..=9");
    }

    #[test]
    fn render_puts_a_caret_under_the_column() {
        let text = "FROM /* INT $upstream";
        let e = RouteError::at(9, "x");
        assert_eq!(e.render(text), format!("{text}\n        ^"));
        // Just past the end of the text.
        let e = RouteError::at(text.chars().count() + 1, "x");
        assert_eq!(e.render(text), format!("{text}\n{}^", " ".repeat(21)));
        // Out of range positions are clamped, not a panic.
        assert!(RouteError::at(1000, "x").render(text).ends_with('^'));
        assert_eq!(RouteError::at(0, "x").render(text), text);
    }

    #[test]
    fn render_picks_the_line_and_keeps_tabs() {
        let text = "FROM /*\n\tWHERE x\r\nINTO y";
        let e = RouteError::at(16, "x"); // the 'x' on the second line
        assert_eq!(e.render(text), "\tWHERE x\n\t      ^");
        let e = RouteError::at(19, "x"); // the 'I' of INTO
        assert_eq!(e.render(text), "INTO y\n^");
        assert_eq!(RouteError::at(1, "x").render(""), "\n^");
    }

    #[test]
    fn render_counts_characters_not_bytes() {
        let text = "FROM /messages/devices/dé x";
        let e = RouteError::at(27, "x");
        assert_eq!(e.render(text), format!("{text}\n{}^", " ".repeat(26)));
    }
}
