//! Route sinks (`INTO ...`): where a matching message goes.

use std::fmt;

use super::error::RouteError;
use super::parser;
use super::source::{segments, PathError};

/// Where a route sends its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `$upstream`: to the cloud.
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`: to a local module's input.
    ModuleInput { module: String, input: String },
    /// `plugin("name")`, optionally `THEN <sink>`: through a filter plugin,
    /// then on to `then` (if any) with what the plugin passes.
    Plugin {
        name: String,
        then: Option<Box<Sink>>,
    },
}

impl Sink {
    /// The plugins this sink hands messages to, in order (a `THEN` chain).
    pub fn plugins(&self) -> Vec<&str> {
        let mut names = Vec::new();
        let mut sink = self;
        while let Sink::Plugin { name, then } = sink {
            names.push(name.as_str());
            match then {
                Some(next) => sink = next,
                None => break,
            }
        }
        names
    }
}

impl Sink {
    /// Parses a sink on its own (the text after `INTO`); error columns are
    /// relative to `text`.
    pub fn parse(text: &str) -> Result<Sink, RouteError> {
        parser::parse_sink(text)
    }
}

/// Canonical text, e.g. `BrokeredEndpoint("/modules/m/inputs/i")` or
/// `plugin("a") THEN $upstream`.
impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Upstream => f.write_str("$upstream"),
            Sink::ModuleInput { module, input } => write!(
                f,
                "BrokeredEndpoint(\"/modules/{}/inputs/{}\")",
                module.replace('"', "\"\""),
                input.replace('"', "\"\"")
            ),
            Sink::Plugin { name, then } => {
                write!(f, "plugin(\"{name}\")")?;
                match then {
                    Some(next) => write!(f, " THEN {next}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Splits `/modules/{module}/inputs/{input}` into module and input.
pub(crate) fn parse_endpoint(path: &str) -> Result<(String, String), PathError> {
    const SHAPE: &str = "an endpoint must look like /modules/{module}/inputs/{input}";
    if !path.starts_with('/') {
        return Err((0, SHAPE.into()));
    }
    let segs = segments(path)?;
    let end = path.chars().count();
    let at = |i: usize| segs.get(i).map_or(end, |&(offset, _)| offset);
    if let Some(&(offset, _)) = segs.iter().find(|&&(_, s)| s == "*") {
        return Err((offset, "wildcards are not allowed in an endpoint".into()));
    }
    let fail = |offset: usize, message: &str| Err((offset, message.to_string()));
    match segs.iter().map(|&(_, s)| s).collect::<Vec<_>>().as_slice() {
        ["modules", module, "inputs", input] => Ok((module.to_string(), input.to_string())),
        [first, ..] if *first != "modules" => fail(at(0), SHAPE),
        ["modules"] => fail(end, "expected a module id after '/modules'"),
        ["modules", _] => fail(end, "expected '/inputs/{input}' after the module id"),
        ["modules", _, "inputs"] => fail(end, "expected an input name after 'inputs'"),
        ["modules", _, "inputs", _, ..] => fail(at(4), "unexpected segment after the input name"),
        _ => fail(at(2), "expected 'inputs' after the module id"),
    }
}

/// Checks a plugin name: ASCII letters, digits, `-`, `_`, `.`.
pub(crate) fn validate_plugin_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err((0, "empty plugin name".into()));
    }
    match name
        .chars()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        None => Ok(()),
        Some(i) => Err((
            i,
            "plugin names may only have letters, digits, '-', '_' and '.'".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(text: &str) -> Sink {
        Sink::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn error(text: &str) -> (usize, String) {
        let e = Sink::parse(text).unwrap_err();
        (e.position, e.message)
    }

    #[test]
    fn a_chain_names_its_plugins_in_order() {
        let s = sink(r#"plugin("a") THEN plugin("b") THEN $upstream"#);
        assert_eq!(s.plugins(), vec!["a", "b"]);
        assert!(sink("$upstream").plugins().is_empty());
    }

    fn input(module: &str, input: &str) -> Sink {
        Sink::ModuleInput {
            module: module.into(),
            input: input.into(),
        }
    }

    fn plugin(name: &str, then: Option<Sink>) -> Sink {
        Sink::Plugin {
            name: name.into(),
            then: then.map(Box::new),
        }
    }

    #[test]
    fn every_form_parses() {
        assert_eq!(sink("$upstream"), Sink::Upstream);
        assert_eq!(sink("$UPSTREAM"), Sink::Upstream);
        assert_eq!(
            sink("BrokeredEndpoint(\"/modules/m1/inputs/in1\")"),
            input("m1", "in1")
        );
        assert_eq!(
            sink("brokeredendpoint ( '/modules/m1/inputs/in1' )"),
            input("m1", "in1")
        );
        assert_eq!(
            sink("plugin(\"filter-1.v2_x\")"),
            plugin("filter-1.v2_x", None)
        );
        assert_eq!(
            sink("PLUGIN('a') then Plugin(\"b\") THEN $upstream"),
            plugin("a", Some(plugin("b", Some(Sink::Upstream))))
        );
        assert_eq!(
            sink("plugin('a') THEN BrokeredEndpoint('/modules/m/inputs/i')"),
            plugin("a", Some(input("m", "i")))
        );
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        let cases = [
            ("$Upstream", "$upstream"),
            (
                "brokeredendpoint('/modules/m/inputs/i')",
                "BrokeredEndpoint(\"/modules/m/inputs/i\")",
            ),
            (
                "plugin('a')  then plugin('b') then $upstream",
                "plugin(\"a\") THEN plugin(\"b\") THEN $upstream",
            ),
            (
                "BrokeredEndpoint('/modules/m\"x/inputs/i')",
                "BrokeredEndpoint(\"/modules/m\"\"x/inputs/i\")",
            ),
        ];
        for (text, canonical) in cases {
            let s = sink(text);
            assert_eq!(s.to_string(), canonical);
            assert_eq!(sink(canonical), s);
        }
    }

    #[test]
    fn bad_sinks_point_at_the_problem() {
        let shape = "an endpoint must look like /modules/{module}/inputs/{input}";
        let cases = [
            ("", 1, "empty sink"),
            ("upstream", 1, "expected a sink ($upstream, BrokeredEndpoint(\"...\") or plugin(\"...\")), found 'upstream'"),
            ("$downstream", 1, "expected a sink ($upstream, BrokeredEndpoint(\"...\") or plugin(\"...\")), found '$downstream'"),
            ("BrokeredEndpoint", 17, "expected '(', found end of text"),
            ("BrokeredEndpoint(/modules/m/inputs/i)", 18, "expected a quoted endpoint path, found '/modules/m/inputs/i)'"),
            ("BrokeredEndpoint(\"/modules/m/inputs/i\"", 39, "expected ')', found end of text"),
            ("BrokeredEndpoint(\"modules/m/inputs/i\")", 19, shape),
            ("BrokeredEndpoint(\"\")", 19, shape),
            ("BrokeredEndpoint(\"/module/m/inputs/i\")", 20, shape),
            ("BrokeredEndpoint(\"/modules/m/outputs/i\")", 30, "expected 'inputs' after the module id"),
            ("BrokeredEndpoint(\"/modules/m\")", 29, "expected '/inputs/{input}' after the module id"),
            ("BrokeredEndpoint(\"/modules/m/inputs\")", 36, "expected an input name after 'inputs'"),
            ("BrokeredEndpoint(\"/modules/m/inputs/i/x\")", 39, "unexpected segment after the input name"),
            ("BrokeredEndpoint(\"/modules/*/inputs/i\")", 28, "wildcards are not allowed in an endpoint"),
            ("BrokeredEndpoint(\"/modules//inputs/i\")", 27, "empty path segment"),
            // Escaped quotes count as the characters they are written with.
            ("BrokeredEndpoint(\"/modules/a\"\"b/inputs/i/x\")", 42, "unexpected segment after the input name"),
            ("plugin()", 8, "expected a quoted plugin name, found ')'"),
            ("plugin('')", 9, "empty plugin name"),
            ("plugin('my plugin')", 11, "plugin names may only have letters, digits, '-', '_' and '.'"),
            ("plugin('a') THEN", 17, "expected a sink ($upstream, BrokeredEndpoint(\"...\") or plugin(\"...\")), found end of text"),
            ("$upstream THEN plugin('a')", 11, "THEN may only follow plugin(...)"),
            ("$upstream $upstream", 11, "unexpected '$upstream' after the sink"),
            ("plugin('a') x", 13, "unexpected 'x' after the sink"),
        ];
        for (text, position, message) in cases {
            assert_eq!(error(text), (position, message.to_string()), "{text}");
        }
    }

    #[test]
    fn plugin_chains_are_bounded() {
        let chain = |n: usize| {
            let mut text = "plugin('p') THEN ".repeat(n);
            text.push_str("$upstream");
            text
        };
        assert!(Sink::parse(&chain(20)).is_ok());
        let e = Sink::parse(&chain(1000)).unwrap_err();
        assert!(e.message.contains("nested too deeply"), "{e}");
    }
}
