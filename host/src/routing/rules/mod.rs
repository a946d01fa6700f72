//! Route rules: the hub's route language, modelled on Azure IoT Edge routes,
//! `FROM <source> [WHERE <condition>] INTO <sink>` (keywords in any case).
//!
//! Owns parsing routes and route entries (from config or the twin) into a
//! [`RouteTable`], and deciding which routes a message matches. It does not
//! deliver anything: the caller sends each matching route's message on to
//! its [`Sink`].
//!
//! - `source.rs`: source patterns such as `/messages/modules/m1/*`.
//! - `condition.rs`: conditions, the [`Fields`] they read, evaluation.
//! - `sink.rs`: `$upstream`, `BrokeredEndpoint(...)`, `plugin(...) THEN ...`.
//! - `lexer.rs`, `parser.rs`: the text; `error.rs`: [`RouteError`].

mod condition;
mod error;
mod lexer;
mod parser;
mod sink;
mod source;

use serde_json::Value as Json;

pub use condition::{Condition, Fields};
pub use error::RouteError;
pub use sink::Sink;
pub use source::SourcePattern;

/// The lowest route priority (0 is the highest).
pub const MAX_PRIORITY: u8 = 9;

/// What happens to a message its route's sink could not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Carry on as if it had been delivered.
    Pass,
    /// Discard it.
    Drop,
    /// Keep it aside in the dead-letter queue.
    #[default]
    DeadLetter,
}

/// One named route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub text: String,
    pub source: SourcePattern,
    pub condition: Option<Condition>,
    pub sink: Sink,
    /// 0 (highest) to [`MAX_PRIORITY`].
    pub priority: u8,
    /// `None`: the hub's default time to live.
    pub ttl_secs: Option<u32>,
    pub on_error: OnError,
}

impl Route {
    /// Parses route text, with the default priority, TTL and error policy.
    pub fn parse(name: &str, text: &str) -> Result<Route, RouteError> {
        let parsed = parser::parse_route(text)?;
        Ok(Route {
            name: name.to_string(),
            text: text.to_string(),
            source: parsed.source,
            condition: parsed.condition,
            sink: parsed.sink,
            priority: 0,
            ttl_secs: None,
            on_error: OnError::default(),
        })
    }

    /// Parses a route entry: the route text as a string, or an object
    /// `{"route": "...", "priority": 0..=9, "timeToLiveSecs": u32,
    /// "onError": "pass" | "drop" | "deadletter"}` where only `route` is
    /// required (`null` counts as absent). Errors in the route text point
    /// into it; errors in the entry itself have position 0.
    pub fn from_json(name: &str, v: &Json) -> Result<Route, RouteError> {
        let entry = |message: String| RouteError::at(0, message);
        let fields = match v {
            Json::String(text) => return Route::parse(name, text),
            Json::Object(fields) => fields,
            _ => {
                return Err(entry(
                    "a route must be a string or an object with a \"route\" key".into(),
                ))
            }
        };
        if let Some(key) = fields
            .keys()
            .find(|k| !["route", "priority", "timeToLiveSecs", "onError"].contains(&k.as_str()))
        {
            return Err(entry(format!(
                "unknown key \"{key}\" (expected route, priority, timeToLiveSecs or onError)"
            )));
        }
        let present = |key: &str| fields.get(key).filter(|v| !v.is_null());
        let text = match present("route") {
            Some(Json::String(text)) => text,
            Some(_) => return Err(entry("\"route\" must be a string".into())),
            None => return Err(entry("missing \"route\"".into())),
        };
        let mut route = Route::parse(name, text)?;
        if let Some(p) = present("priority") {
            route.priority = p
                .as_u64()
                .filter(|&p| p <= u64::from(MAX_PRIORITY))
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| {
                    entry(format!(
                        "\"priority\" must be an integer from 0 to {MAX_PRIORITY}, not {p}"
                    ))
                })?;
        }
        if let Some(t) = present("timeToLiveSecs") {
            let ttl = t
                .as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    entry(format!(
                        "\"timeToLiveSecs\" must be a whole number of seconds (0 to {}), not {t}",
                        u32::MAX
                    ))
                })?;
            route.ttl_secs = Some(ttl);
        }
        if let Some(o) = present("onError") {
            route.on_error = match o.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("pass") => OnError::Pass,
                Some("drop") => OnError::Drop,
                Some("deadletter") => OnError::DeadLetter,
                _ => {
                    return Err(entry(format!(
                        "\"onError\" must be \"pass\", \"drop\" or \"deadletter\", not {o}"
                    )))
                }
            };
        }
        Ok(route)
    }

    /// Whether a message from `source` with these fields takes this route:
    /// the source matches and the condition, if any, is exactly true.
    pub fn matches(&self, source: &str, fields: &dyn Fields) -> bool {
        self.matches_lazily(|| source, fields)
    }

    /// As [`Route::matches`], asking for the source only when the pattern
    /// needs it (`/messages/*` takes every source: a route from it never
    /// pays for working out where a message came from).
    pub fn matches_lazily<'s>(
        &self,
        source: impl FnOnce() -> &'s str,
        fields: &dyn Fields,
    ) -> bool {
        (self.source.matches_every_source() || self.source.matches(source()))
            && self.condition.as_ref().is_none_or(|c| c.matches(fields))
    }

    /// Whether matching may read the message body.
    pub fn uses_body(&self) -> bool {
        self.condition.as_ref().is_some_and(Condition::uses_body)
    }
}

/// A set of routes, in priority order (then by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        RouteTable { routes }
    }

    /// Parses a JSON object of route name to entry (see [`Route::from_json`]).
    /// On failure returns every error, one per bad route, by route name; an
    /// error about `v` itself has an empty name.
    pub fn from_json(v: &Json) -> Result<RouteTable, Vec<(String, RouteError)>> {
        let Json::Object(entries) = v else {
            return Err(vec![(
                String::new(),
                RouteError::at(0, "routes must be a JSON object of route name to route"),
            )]);
        };
        let mut routes = Vec::new();
        let mut errors = Vec::new();
        for (name, entry) in entries {
            match Route::from_json(name, entry) {
                Ok(route) => routes.push(route),
                Err(e) => errors.push((name.clone(), e)),
            }
        }
        if errors.is_empty() {
            Ok(RouteTable::new(routes))
        } else {
            errors.sort_by(|a, b| a.0.cmp(&b.0));
            Err(errors)
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The routes a message takes, in priority order.
    pub fn matching<'a>(
        &'a self,
        source: &'a str,
        fields: &'a dyn Fields,
    ) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes
            .iter()
            .filter(move |r| r.matches(source, fields))
    }

    /// Whether any route's condition reads the message body.
    pub fn uses_body(&self) -> bool {
        self.routes.iter().any(Route::uses_body)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::condition::tests::Msg;
    use super::*;

    fn names<'a>(it: impl Iterator<Item = &'a Route>) -> Vec<&'a str> {
        it.map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn string_entries_get_defaults() {
        let r = Route::from_json("r", &json!("FROM /* INTO $upstream")).unwrap();
        assert_eq!(r.name, "r");
        assert_eq!(r.text, "FROM /* INTO $upstream");
        assert_eq!(r.priority, 0);
        assert_eq!(r.ttl_secs, None);
        assert_eq!(r.on_error, OnError::DeadLetter);
        assert_eq!(r, Route::parse("r", "FROM /* INTO $upstream").unwrap());
    }

    #[test]
    fn object_entries() {
        let r = Route::from_json(
            "r",
            &json!({
                "route": "FROM /messages/devices/* WHERE a = 1 INTO plugin('p')",
                "priority": 3,
                "timeToLiveSecs": 86400,
                "onError": "drop"
            }),
        )
        .unwrap();
        assert_eq!(r.priority, 3);
        assert_eq!(r.ttl_secs, Some(86400));
        assert_eq!(r.on_error, OnError::Drop);
        assert_eq!(r.source.as_str(), "/messages/devices/*");
        assert!(r.condition.is_some());

        let r = Route::from_json(
            "r",
            &json!({"route": "FROM /* INTO $upstream", "priority": null, "onError": "Pass"}),
        )
        .unwrap();
        assert_eq!(
            (r.priority, r.ttl_secs, r.on_error),
            (0, None, OnError::Pass)
        );
        let r = Route::from_json(
            "r",
            &json!({"route": "FROM /* INTO $upstream", "priority": 9, "timeToLiveSecs": 0, "onError": "deadletter"}),
        )
        .unwrap();
        assert_eq!(
            (r.priority, r.ttl_secs, r.on_error),
            (9, Some(0), OnError::DeadLetter)
        );
    }

    #[test]
    fn bad_entries() {
        let route = "FROM /* INTO $upstream";
        let cases = [
            (json!(5), "a route must be a string or an object with a \"route\" key"),
            (json!(null), "a route must be a string or an object with a \"route\" key"),
            (json!({}), "missing \"route\""),
            (json!({"route": 1}), "\"route\" must be a string"),
            (
                json!({"route": route, "prio": 1}),
                "unknown key \"prio\" (expected route, priority, timeToLiveSecs or onError)",
            ),
            (
                json!({"route": route, "priority": 10}),
                "\"priority\" must be an integer from 0 to 9, not 10",
            ),
            (
                json!({"route": route, "priority": -1}),
                "\"priority\" must be an integer from 0 to 9, not -1",
            ),
            (
                json!({"route": route, "priority": "1"}),
                "\"priority\" must be an integer from 0 to 9, not \"1\"",
            ),
            (
                json!({"route": route, "priority": 1.5}),
                "\"priority\" must be an integer from 0 to 9, not 1.5",
            ),
            (
                json!({"route": route, "timeToLiveSecs": 4294967296u64}),
                "\"timeToLiveSecs\" must be a whole number of seconds (0 to 4294967295), not 4294967296",
            ),
            (
                json!({"route": route, "onError": "retry"}),
                "\"onError\" must be \"pass\", \"drop\" or \"deadletter\", not \"retry\"",
            ),
        ];
        for (v, message) in cases {
            let e = Route::from_json("r", &v).unwrap_err();
            assert_eq!(e, RouteError::at(0, message), "{v}");
            assert_eq!(e.to_string(), message);
        }
        // Errors in the route text keep their columns.
        let e = Route::from_json("r", &json!({"route": "FROM /* INTO $up"})).unwrap_err();
        assert_eq!(e.position, 14);
    }

    #[test]
    fn table_is_sorted_by_priority_then_name() {
        let table = RouteTable::from_json(&json!({
            "zeta": "FROM /* INTO $upstream",
            "alpha": {"route": "FROM /* INTO $upstream", "priority": 2},
            "beta": {"route": "FROM /* INTO $upstream", "priority": 0},
            "gamma": {"route": "FROM /* INTO $upstream", "priority": 2},
        }))
        .unwrap();
        assert_eq!(
            names(table.routes().iter()),
            ["beta", "zeta", "alpha", "gamma"]
        );
        assert!(!table.uses_body());
        assert_eq!(RouteTable::from_json(&json!({})).unwrap().routes(), &[]);
    }

    #[test]
    fn table_reports_every_bad_route() {
        let errors = RouteTable::from_json(&json!({
            "ok": "FROM /* INTO $upstream",
            "b": "FROM /* INTO",
            "a": {"route": "FROM /* INTO $upstream", "priority": 12},
            "c": "FROM /nope INTO $upstream",
        }))
        .unwrap_err();
        let got: Vec<(&str, usize)> = errors
            .iter()
            .map(|(n, e)| (n.as_str(), e.position))
            .collect();
        assert_eq!(got, [("a", 0), ("b", 13), ("c", 7)]);

        let errors = RouteTable::from_json(&json!(["FROM /* INTO $upstream"])).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "");
    }

    #[test]
    fn matching_routes() {
        let table = RouteTable::from_json(&json!({
            "all": "FROM /messages/* INTO $upstream",
            "hot": {
                "route": "FROM /messages/modules/sensor/outputs/* WHERE temperature > 30 INTO BrokeredEndpoint(\"/modules/alarm/inputs/hot\")",
                "priority": 1
            },
            "d1": "FROM /messages/devices/d1 INTO plugin('audit') THEN $upstream",
            "body": {
                "route": "FROM /messages/modules/sensor/* WHERE $body.level = 'critical' INTO plugin('page')",
                "priority": 0
            },
            "not-modules": "FROM /messages/devices/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream",
        }))
        .unwrap();
        assert!(table.uses_body());

        let hot = Msg::default()
            .app("temperature", "35")
            .body(json!({"level": "critical"}));
        let source = "/messages/modules/sensor/outputs/out1";
        assert_eq!(names(table.matching(source, &hot)), ["all", "body", "hot"]);

        let cool = Msg::default().app("temperature", "20");
        assert_eq!(names(table.matching(source, &cool)), ["all"]);

        let device = Msg::default();
        assert_eq!(
            names(table.matching("/messages/devices/d1", &device)),
            ["all", "d1", "not-modules"]
        );
        let via_module = Msg::default().sys("$connectionModuleId", "m");
        assert_eq!(
            names(table.matching("/messages/devices/d2", &via_module)),
            ["all"]
        );
        // Every source the hub makes starts with /messages/, so
        // `/messages/*` takes any message without looking at its source.
        assert_eq!(names(table.matching("/other", &device)), ["all"]);
    }

    /// A small deterministic generator (xorshift), so the test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Checks what must hold for any input: no panic, errors inside the text
    /// (or just after it), and parsed routes evaluate and print back.
    fn check(text: &str, msgs: &[Msg]) -> bool {
        match Route::parse("fuzz", text) {
            Err(e) => {
                assert!(
                    (1..=text.chars().count() + 1).contains(&e.position),
                    "{text:?}: {e}"
                );
                let _ = e.render(text);
                false
            }
            Ok(route) => {
                for msg in msgs {
                    route.matches("/messages/modules/m/outputs/o", msg);
                }
                if let Some(c) = &route.condition {
                    let again = Condition::parse(&c.to_string())
                        .unwrap_or_else(|e| panic!("{text:?} -> {c}: {e}"));
                    assert_eq!(&again, c, "{text:?}");
                }
                assert_eq!(Sink::parse(&route.sink.to_string()).unwrap(), route.sink);
                true
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let msgs = [
            Msg::default(),
            Msg::default()
                .app("a", "1")
                .app("b", "x")
                .sys("$x", "2")
                .body(json!({"a": [1, {"b": "c"}], "n": null})),
        ];
        let pieces = [
            "FROM ",
            "WHERE ",
            "INTO ",
            " AND ",
            " OR ",
            "NOT ",
            "THEN ",
            "/*",
            "/messages/",
            "modules/",
            "devices/",
            "outputs/",
            "m1",
            "*",
            "/",
            "$upstream",
            "$body",
            ".a",
            "[0]",
            "['x']",
            "[",
            "]",
            "(",
            ")",
            ",",
            "'",
            "''",
            "\"",
            "=",
            "!=",
            "<>",
            "<",
            "<=",
            ">",
            ">=",
            "!",
            "-",
            "1",
            "1.5e3",
            "-2",
            "e",
            ".",
            "a",
            "b",
            "$x",
            "true",
            "null",
            "IS_DEFINED",
            "LOWER",
            "CONTAINS",
            "STARTS_WITH",
            "BrokeredEndpoint",
            "plugin",
            "\"/modules/m/inputs/i\"",
            "'p'",
            " ",
            "\n",
            "é",
            "\u{0}",
            "#",
            "{",
            "}",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let n = 1 + rng.below(14);
            let text: String = (0..n).map(|_| pieces[rng.below(pieces.len())]).collect();
            parsed += usize::from(check(&text, &msgs));
        }
        // Mutations of valid routes: delete, duplicate or replace a character.
        let seeds = [
            "FROM /messages/modules/m/outputs/* WHERE a > 1 AND NOT IS_NULL($body.a[1].b) OR $x = '2' INTO plugin('f') THEN BrokeredEndpoint(\"/modules/m/inputs/i\")",
            "FROM /* WHERE STARTS_WITH(LOWER([b]), 'x') INTO $upstream",
        ];
        let alphabet: Vec<char> = "()[]'\".,=<>!$/* aFNW1-e".chars().collect();
        for seed in seeds {
            assert!(check(seed, &msgs));
            let chars: Vec<char> = seed.chars().collect();
            for _ in 0..5_000 {
                let mut c = chars.clone();
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(c.len());
                    match rng.below(3) {
                        0 => {
                            c.remove(i);
                        }
                        1 => c.insert(i, c[i]),
                        _ => c[i] = alphabet[rng.below(alphabet.len())],
                    }
                    if c.is_empty() {
                        break;
                    }
                }
                let text: String = c.into_iter().collect();
                parsed += usize::from(check(&text, &msgs));
            }
        }
        // Make sure the generator also reaches valid routes.
        assert!(parsed > 100, "only {parsed} parsed");
    }
}
