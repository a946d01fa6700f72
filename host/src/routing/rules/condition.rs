//! Route conditions (`WHERE ...`): the syntax tree, the message fields it
//! reads, and its evaluation with IoT Hub's three-valued logic.
//!
//! Values are undefined, null, booleans, numbers, strings and (from the JSON
//! body only) objects and arrays. Properties are always strings (so
//! `IS_NUMBER(prop)` is false); body values keep their JSON types. A
//! comparison with an undefined operand, or between values of different
//! types, is undefined, except that a property string that reads as a number
//! compares numerically with a number. Strings compare by code point; null
//! and booleans support only `=` and `!=`.
//! `false AND undefined` is false, `true OR undefined` is true, and otherwise
//! undefined propagates; a route matches only when its condition is true.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use serde_json::Value as Json;

use super::error::RouteError;
use super::lexer::{is_ident_char, is_ident_start, is_keyword, parse_number};
use super::parser;

/// What a condition reads from a message.
pub trait Fields {
    /// An application property (user property) by name.
    fn app_property(&self, name: &str) -> Option<&str>;
    /// A system property by name, including the `$` (e.g. `$connectionDeviceId`).
    fn system_property(&self, name: &str) -> Option<&str>;
    /// The body as JSON; `None` when it is not JSON. Called only by conditions
    /// that use `$body`, possibly more than once per evaluation, so it should
    /// parse at most once (e.g. into a `OnceCell`).
    fn body_json(&self) -> Option<&Json>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord.is_eq(),
            CmpOp::Ne => ord.is_ne(),
            CmpOp::Lt => ord.is_lt(),
            CmpOp::Le => ord.is_le(),
            CmpOp::Gt => ord.is_gt(),
            CmpOp::Ge => ord.is_ge(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Function {
    IsDefined,
    IsString,
    IsNumber,
    IsBool,
    IsNull,
    StartsWith,
    EndsWith,
    Contains,
    Lower,
    Upper,
    Length,
}

impl Function {
    const ALL: [Function; 11] = [
        Function::IsDefined,
        Function::IsString,
        Function::IsNumber,
        Function::IsBool,
        Function::IsNull,
        Function::StartsWith,
        Function::EndsWith,
        Function::Contains,
        Function::Lower,
        Function::Upper,
        Function::Length,
    ];

    /// Looks a function up by name, ignoring case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        match self {
            Function::IsDefined => "IS_DEFINED",
            Function::IsString => "IS_STRING",
            Function::IsNumber => "IS_NUMBER",
            Function::IsBool => "IS_BOOL",
            Function::IsNull => "IS_NULL",
            Function::StartsWith => "STARTS_WITH",
            Function::EndsWith => "ENDS_WITH",
            Function::Contains => "CONTAINS",
            Function::Lower => "LOWER",
            Function::Upper => "UPPER",
            Function::Length => "LENGTH",
        }
    }

    pub fn arity(self) -> usize {
        match self {
            Function::StartsWith | Function::EndsWith | Function::Contains => 2,
            _ => 1,
        }
    }
}

/// One step of a `$body` path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PathStep {
    Field(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Literal(Literal),
    AppProperty(String),
    /// Name including the `$`.
    SystemProperty(String),
    Body(Vec<PathStep>),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    Call(Function, Vec<Expr>),
}

impl Expr {
    fn uses_body(&self) -> bool {
        match self {
            Expr::Body(_) => true,
            Expr::Literal(_) | Expr::AppProperty(_) | Expr::SystemProperty(_) => false,
            Expr::Not(e) => e.uses_body(),
            Expr::Compare(_, l, r) => l.uses_body() || r.uses_body(),
            Expr::And(es) | Expr::Or(es) | Expr::Call(_, es) => es.iter().any(Expr::uses_body),
        }
    }
}

/// A parsed route condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    uses_body: bool,
}

impl Condition {
    pub(crate) fn new(expr: Expr) -> Self {
        let uses_body = expr.uses_body();
        Self { expr, uses_body }
    }

    /// Parses a condition on its own (the text after `WHERE`); error columns
    /// are relative to `text`.
    pub fn parse(text: &str) -> Result<Condition, RouteError> {
        parser::parse_condition(text)
    }

    /// Whether evaluating needs the message body (`$body` appears).
    pub fn uses_body(&self) -> bool {
        self.uses_body
    }

    /// The condition's value: `Some(true)`/`Some(false)`, or `None` when it is
    /// undefined or not a boolean.
    pub fn evaluate(&self, fields: &dyn Fields) -> Option<bool> {
        eval(&self.expr, fields).truth()
    }

    /// Whether the condition is exactly true for the message.
    pub fn matches(&self, fields: &dyn Fields) -> bool {
        self.evaluate(fields) == Some(true)
    }
}

/// Canonical text: every comparison, AND and OR in parentheses, and so is a
/// NOT that is a comparison operand (`((NOT a) = b)`), since NOT binds less
/// tightly than comparison.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
    }
}

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    /// `property` marks strings read from (or derived from) a message
    /// property, which compare numerically with numbers when they can.
    Str {
        s: Cow<'a, str>,
        property: bool,
    },
    /// A JSON object or array from the body: defined, but not comparable.
    Complex,
}

impl<'a> Val<'a> {
    fn truth(&self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn property(s: &'a str) -> Self {
        Val::Str {
            s: Cow::Borrowed(s),
            property: true,
        }
    }

    fn from_json(v: &'a Json) -> Self {
        match v {
            Json::Null => Val::Null,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => n.as_f64().map_or(Val::Undefined, Val::Number),
            Json::String(s) => Val::Str {
                s: Cow::Borrowed(s),
                property: false,
            },
            Json::Array(_) | Json::Object(_) => Val::Complex,
        }
    }
}

fn eval<'a>(expr: &'a Expr, fields: &'a dyn Fields) -> Val<'a> {
    match expr {
        Expr::Literal(Literal::Null) => Val::Null,
        Expr::Literal(Literal::Bool(b)) => Val::Bool(*b),
        Expr::Literal(Literal::Number(n)) => Val::Number(*n),
        Expr::Literal(Literal::String(s)) => Val::Str {
            s: Cow::Borrowed(s),
            property: false,
        },
        Expr::AppProperty(name) => fields
            .app_property(name)
            .map_or(Val::Undefined, Val::property),
        Expr::SystemProperty(name) => fields
            .system_property(name)
            .map_or(Val::Undefined, Val::property),
        Expr::Body(path) => body(path, fields),
        Expr::Not(e) => match eval(e, fields).truth() {
            Some(b) => Val::Bool(!b),
            None => Val::Undefined,
        },
        Expr::And(es) => fold(es, fields, false),
        Expr::Or(es) => fold(es, fields, true),
        Expr::Compare(op, l, r) => compare(*op, &eval(l, fields), &eval(r, fields)),
        Expr::Call(func, args) => call(*func, args, fields),
    }
}

/// AND (`decisive` = false) or OR (`decisive` = true): the decisive value
/// wins outright; otherwise any non-boolean makes the result undefined.
fn fold<'a>(es: &'a [Expr], fields: &'a dyn Fields, decisive: bool) -> Val<'a> {
    let mut defined = true;
    for e in es {
        match eval(e, fields).truth() {
            Some(b) if b == decisive => return Val::Bool(decisive),
            Some(_) => {}
            None => defined = false,
        }
    }
    if defined {
        Val::Bool(!decisive)
    } else {
        Val::Undefined
    }
}

fn body<'a>(path: &[PathStep], fields: &'a dyn Fields) -> Val<'a> {
    let Some(mut v) = fields.body_json() else {
        return Val::Undefined;
    };
    for step in path {
        let next = match (step, v) {
            (PathStep::Field(name), Json::Object(map)) => map.get(name),
            (PathStep::Index(i), Json::Array(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return Val::Undefined,
        }
    }
    Val::from_json(v)
}

fn compare(op: CmpOp, l: &Val<'_>, r: &Val<'_>) -> Val<'static> {
    let equality_only = |equal: bool| match op {
        CmpOp::Eq => Val::Bool(equal),
        CmpOp::Ne => Val::Bool(!equal),
        _ => Val::Undefined,
    };
    let ordered = |ord: Option<Ordering>| ord.map_or(Val::Undefined, |o| Val::Bool(op.holds(o)));
    match (l, r) {
        (Val::Null, Val::Null) => equality_only(true),
        (Val::Bool(a), Val::Bool(b)) => equality_only(a == b),
        (Val::Number(a), Val::Number(b)) => ordered(a.partial_cmp(b)),
        (Val::Str { s: a, .. }, Val::Str { s: b, .. }) => ordered(Some(a.cmp(b))),
        (Val::Str { s, property: true }, Val::Number(n)) => {
            ordered(parse_number(s).and_then(|p| p.partial_cmp(n)))
        }
        (Val::Number(n), Val::Str { s, property: true }) => {
            ordered(parse_number(s).and_then(|p| n.partial_cmp(&p)))
        }
        _ => Val::Undefined,
    }
}

fn call<'a>(func: Function, args: &'a [Expr], fields: &'a dyn Fields) -> Val<'a> {
    let mut vals = args.iter().map(|a| eval(a, fields));
    let first = vals.next().unwrap_or(Val::Undefined);
    let second = vals.next().unwrap_or(Val::Undefined);
    let string_test = |test: fn(&str, &str) -> bool| match (&first, &second) {
        (Val::Str { s: a, .. }, Val::Str { s: b, .. }) => Val::Bool(test(a, b)),
        _ => Val::Undefined,
    };
    let map_string = |map: fn(&str) -> String| match &first {
        Val::Str { s, property } => Val::Str {
            s: Cow::Owned(map(s)),
            property: *property,
        },
        _ => Val::Undefined,
    };
    match func {
        Function::IsDefined => Val::Bool(first != Val::Undefined),
        Function::IsString => Val::Bool(matches!(first, Val::Str { .. })),
        Function::IsNumber => Val::Bool(matches!(first, Val::Number(_))),
        Function::IsBool => Val::Bool(matches!(first, Val::Bool(_))),
        Function::IsNull => Val::Bool(first == Val::Null),
        Function::StartsWith => string_test(|a, b| a.starts_with(b)),
        Function::EndsWith => string_test(|a, b| a.ends_with(b)),
        Function::Contains => string_test(|a, b| a.contains(b)),
        Function::Lower => map_string(str::to_lowercase),
        Function::Upper => map_string(str::to_uppercase),
        Function::Length => match &first {
            Val::Str { s, .. } => Val::Number(s.chars().count() as f64),
            _ => Val::Undefined,
        },
    }
}

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    write!(f, "'{}'", s.replace('\'', "''"))
}

fn is_bare_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_ident_start) && chars.all(is_ident_char) && !is_keyword(name)
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, es: &[Expr], sep: &str| {
            for (i, e) in es.iter().enumerate() {
                if i > 0 {
                    f.write_str(sep)?;
                }
                write!(f, "{e}")?;
            }
            Ok(())
        };
        match self {
            Expr::Literal(Literal::Null) => f.write_str("null"),
            Expr::Literal(Literal::Bool(b)) => write!(f, "{b}"),
            Expr::Literal(Literal::Number(n)) => write!(f, "{n}"),
            Expr::Literal(Literal::String(s)) => write_quoted(f, s),
            Expr::AppProperty(name) if is_bare_name(name) => f.write_str(name),
            Expr::AppProperty(name) => write!(f, "[{name}]"),
            Expr::SystemProperty(name) => f.write_str(name),
            Expr::Body(path) => {
                f.write_str("$body")?;
                for step in path {
                    match step {
                        PathStep::Index(i) => write!(f, "[{i}]")?,
                        PathStep::Field(name)
                            if !name.is_empty() && name.chars().all(is_ident_char) =>
                        {
                            write!(f, ".{name}")?
                        }
                        PathStep::Field(name) => {
                            f.write_str("[")?;
                            write_quoted(f, name)?;
                            f.write_str("]")?;
                        }
                    }
                }
                Ok(())
            }
            Expr::Not(e) => write!(f, "NOT {e}"),
            Expr::And(es) | Expr::Or(es) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                f.write_str("(")?;
                join(f, es, sep)?;
                f.write_str(")")
            }
            Expr::Compare(op, l, r) => {
                // `NOT a = b` would read back as `NOT (a = b)`.
                let operand = |f: &mut fmt::Formatter<'_>, e: &Expr| match e {
                    Expr::Not(_) => write!(f, "({e})"),
                    _ => write!(f, "{e}"),
                };
                f.write_str("(")?;
                operand(f, l)?;
                write!(f, " {} ", op.symbol())?;
                operand(f, r)?;
                f.write_str(")")
            }
            Expr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                join(f, args, ", ")?;
                f.write_str(")")
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    /// A message for tests.
    #[derive(Default)]
    pub(crate) struct Msg {
        pub app: HashMap<String, String>,
        pub sys: HashMap<String, String>,
        pub body: Option<Json>,
    }

    impl Msg {
        pub fn app(mut self, k: &str, v: &str) -> Self {
            self.app.insert(k.into(), v.into());
            self
        }
        pub fn sys(mut self, k: &str, v: &str) -> Self {
            self.sys.insert(k.into(), v.into());
            self
        }
        pub fn body(mut self, v: Json) -> Self {
            self.body = Some(v);
            self
        }
    }

    impl Fields for Msg {
        fn app_property(&self, name: &str) -> Option<&str> {
            self.app.get(name).map(String::as_str)
        }
        fn system_property(&self, name: &str) -> Option<&str> {
            self.sys.get(name).map(String::as_str)
        }
        fn body_json(&self) -> Option<&Json> {
            self.body.as_ref()
        }
    }

    fn eval_with(text: &str, msg: &Msg) -> Option<bool> {
        Condition::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .evaluate(msg)
    }

    fn eval_empty(text: &str) -> Option<bool> {
        eval_with(text, &Msg::default())
    }

    const T: Option<bool> = Some(true);
    const F: Option<bool> = Some(false);
    const U: Option<bool> = None;

    #[test]
    fn three_valued_truth_tables() {
        // `u` is an undefined property; comparing it yields undefined.
        let operand = |v: Option<bool>| match v {
            Some(true) => "true",
            Some(false) => "false",
            None => "(u = 1)",
        };
        let all = [T, F, U];
        for a in all {
            let not = eval_empty(&format!("NOT {}", operand(a)));
            assert_eq!(not, a.map(|b| !b), "NOT {a:?}");
            for b in all {
                let and = eval_empty(&format!("{} AND {}", operand(a), operand(b)));
                let or = eval_empty(&format!("{} OR {}", operand(a), operand(b)));
                let want_and = match (a, b) {
                    (F, _) | (_, F) => F,
                    (T, T) => T,
                    _ => U,
                };
                let want_or = match (a, b) {
                    (T, _) | (_, T) => T,
                    (F, F) => F,
                    _ => U,
                };
                assert_eq!(and, want_and, "{a:?} AND {b:?}");
                assert_eq!(or, want_or, "{a:?} OR {b:?}");
            }
        }
    }

    #[test]
    fn non_booleans_are_undefined_in_logic() {
        assert_eq!(eval_empty("1 AND true"), U);
        assert_eq!(eval_empty("'x' OR false"), U);
        assert_eq!(eval_empty("'x' OR true"), T);
        assert_eq!(eval_empty("NOT 'x'"), U);
        assert_eq!(eval_empty("NOT null"), U);
        assert_eq!(eval_empty("5"), U);
        assert_eq!(eval_empty("true"), T);
        assert_eq!(eval_empty("false"), F);
    }

    #[test]
    fn long_chains() {
        assert_eq!(eval_empty("true AND true AND u = 1 AND false"), F);
        assert_eq!(eval_empty("false OR u = 1 OR false OR true"), T);
        assert_eq!(eval_empty("false OR u = 1 OR false"), U);
    }

    #[test]
    fn comparisons_of_literals() {
        let cases = [
            ("1 = 1", T),
            ("1 = 1.0", T),
            ("1 != 2", T),
            ("1 <> 1", F),
            ("1 < 2", T),
            ("2 <= 2", T),
            ("3 > 2", T),
            ("2 >= 3", F),
            ("-1.5e1 < -15.0", F),
            ("'a' = 'a'", T),
            ("'a' < 'b'", T),
            ("'B' < 'a'", T),
            ("'abc' >= 'abd'", F),
            ("\"x\" = 'x'", T),
            ("true = true", T),
            ("true != false", T),
            ("true < false", U),
            ("null = null", T),
            ("null != null", F),
            ("null < null", U),
            // Mixed types are undefined, even with null.
            ("1 = '1'", U),
            ("'1' = 1", U),
            ("1 = true", U),
            ("null = 0", U),
            ("'a' != null", U),
        ];
        for (text, want) in cases {
            assert_eq!(eval_empty(text), want, "{text}");
        }
    }

    #[test]
    fn property_strings_compare_numerically_with_numbers() {
        let msg = Msg::default()
            .app("temp", "31.5")
            .app("count", "007")
            .app("name", "thirty")
            .app("big", "1e3")
            .app("nan", "NaN")
            .app("spaced", " 5")
            .sys("$contentType", "application/json");
        let cases = [
            ("temp > 30", T),
            ("temp < 30", F),
            ("30 < temp", T),
            ("temp = 31.5", T),
            ("count = 7", T),
            ("big = 1000", T),
            ("big >= 999.5", T),
            // ... but as strings against strings.
            ("temp = '31.5'", T),
            ("count = '7'", F),
            ("temp > '4'", F),
            // Strings that are not numbers do not compare with numbers.
            ("name > 30", U),
            ("name != 30", U),
            ("nan = 1", U),
            ("nan != 1", U),
            ("spaced = 5", U),
            // Missing properties are undefined.
            ("missing = 1", U),
            ("missing != 1", U),
            ("$contentType = 'application/json'", T),
            ("$contentType = 1", U),
            ("$missing = 'x'", U),
            // Property against property: strings.
            ("temp = count", F),
            ("temp > count", T),
        ];
        for (text, want) in cases {
            assert_eq!(eval_with(text, &msg), want, "{text}");
        }
    }

    #[test]
    fn body_paths() {
        let msg = Msg::default().body(json!({
            "a": {"b": 5, "s": "7", "t": true, "n": null},
            "list": [{"v": 1}, {"v": 2}],
            "odd key": "yes",
            "arr": [10, 20]
        }));
        let cases = [
            ("$body.a.b = 5", T),
            ("$body.a.b > 4.5", T),
            // Body strings keep their JSON type: no numeric coercion.
            ("$body.a.s = 7", U),
            ("$body.a.s = '7'", T),
            ("$body.a.t = true", T),
            ("$body.a.t", T),
            ("$body.a.n = null", T),
            ("IS_NULL($body.a.n)", T),
            ("$body.list[1].v = 2", T),
            ("$body.list[2].v = 2", U),
            ("$body.arr[0] < $body.arr[1]", T),
            ("$body['odd key'] = 'yes'", T),
            ("$body.a[0] = 1", U),
            ("$body.list.v = 1", U),
            ("$body.missing = 1", U),
            ("IS_DEFINED($body.a)", T),
            ("IS_DEFINED($body.a.zz)", F),
            ("$body.a = 1", U),
            ("$body = $body", U),
            ("IS_DEFINED($body)", T),
        ];
        for (text, want) in cases {
            assert_eq!(eval_with(text, &msg), want, "{text}");
        }
        // A body that is not JSON makes every body path undefined.
        let not_json = Msg::default().app("a", "1");
        assert_eq!(eval_with("$body.a = 1", &not_json), U);
        assert_eq!(eval_with("IS_DEFINED($body)", &not_json), F);
        assert_eq!(eval_with("a = 1 OR $body.a = 1", &not_json), T);
    }

    #[test]
    fn functions() {
        let msg = Msg::default()
            .app("dev", "Sensor-42")
            .app("num", "5")
            .body(json!({"n": 3, "b": false, "z": null, "s": "Héllo", "o": {}}));
        let cases = [
            ("IS_DEFINED(dev)", T),
            ("IS_DEFINED(nope)", F),
            ("IS_STRING(dev)", T),
            ("IS_STRING(num)", T),
            ("IS_STRING($body.s)", T),
            ("IS_STRING($body.n)", F),
            ("IS_STRING(nope)", F),
            ("IS_NUMBER(num)", F),
            ("IS_NUMBER($body.n)", T),
            ("IS_NUMBER(1.5)", T),
            ("IS_BOOL($body.b)", T),
            ("IS_BOOL('true')", F),
            ("IS_NULL($body.z)", T),
            ("IS_NULL(nope)", F),
            ("IS_NULL($body.o)", F),
            ("STARTS_WITH(dev, 'Sensor')", T),
            ("STARTS_WITH(dev, 'sensor')", F),
            ("ENDS_WITH(dev, '-42')", T),
            ("CONTAINS(dev, 'or-4')", T),
            ("CONTAINS(dev, nope)", U),
            ("CONTAINS($body.n, '3')", U),
            ("STARTS_WITH(nope, 'a')", U),
            ("LOWER(dev) = 'sensor-42'", T),
            ("UPPER(dev) = 'SENSOR-42'", T),
            ("UPPER($body.s) = 'HÉLLO'", T),
            ("LOWER($body.n) = 3", U),
            ("LENGTH(dev) = 9", T),
            ("LENGTH($body.s) = 5", T),
            ("LENGTH(nope) = 0", U),
            ("LENGTH($body.n) = 1", U),
            // Property-ness survives LOWER: still compares numerically.
            ("LOWER(num) = 5", T),
            ("is_defined(dev) AND Starts_With(dev, 'S')", T),
        ];
        for (text, want) in cases {
            assert_eq!(eval_with(text, &msg), want, "{text}");
        }
    }

    #[test]
    fn bracketed_and_keyword_named_properties() {
        let msg = Msg::default().app("alert-level", "high").app("and", "x");
        assert_eq!(eval_with("[alert-level] = 'high'", &msg), T);
        assert_eq!(eval_with("[and] = 'x'", &msg), T);
    }

    #[test]
    fn precedence() {
        let shown = |t: &str| Condition::parse(t).unwrap().to_string();
        assert_eq!(
            shown("a = 1 OR b = 2 AND c = 3"),
            "((a = 1) OR ((b = 2) AND (c = 3)))"
        );
        assert_eq!(
            shown("(a = 1 OR b = 2) AND c = 3"),
            "(((a = 1) OR (b = 2)) AND (c = 3))"
        );
        assert_eq!(shown("NOT a = 1"), "NOT (a = 1)");
        assert_eq!(shown("NOT (a = 1)"), "NOT (a = 1)");
        assert_eq!(shown("NOT NOT a"), "NOT NOT a");
        assert_eq!(shown("a AND b AND c OR d"), "((a AND b AND c) OR d)");
        assert_eq!(shown("NOT a OR b AND NOT c"), "(NOT a OR (b AND NOT c))");
        assert_eq!(shown("(NOT a) = b"), "((NOT a) = b)");
        assert_eq!(shown("a = (NOT b)"), "(a = (NOT b))");
    }

    #[test]
    fn not_binds_looser_than_comparison() {
        let parsed = |t: &str| Condition::parse(t).unwrap().expr;
        let name = |n: &str| Box::new(Expr::AppProperty(n.into()));
        let number = |n: f64| Box::new(Expr::Literal(Literal::Number(n)));
        let not = |e: Expr| Expr::Not(Box::new(e));

        // `NOT x = 'a'` is `NOT (x = 'a')`, not `(NOT x) = 'a'`.
        let x_is_a = Expr::Compare(
            CmpOp::Eq,
            name("x"),
            Box::new(Expr::Literal(Literal::String("a".into()))),
        );
        assert_eq!(parsed("NOT x = 'a'"), not(x_is_a));
        let msg = Msg::default().app("x", "b");
        assert_eq!(eval_with("NOT x = 'a'", &msg), T);
        assert_eq!(eval_with("NOT x = 'b'", &msg), F);

        // `NOT IS_DEFINED(a) AND b > 1` is `(NOT IS_DEFINED(a)) AND (b > 1)`.
        let want = Expr::And(vec![
            not(Expr::Call(Function::IsDefined, vec![*name("a")])),
            Expr::Compare(CmpOp::Gt, name("b"), number(1.0)),
        ]);
        assert_eq!(parsed("NOT IS_DEFINED(a) AND b > 1"), want);
        assert_eq!(parsed("(NOT IS_DEFINED(a)) AND (b > 1)"), want);
        let b2 = Msg::default().app("b", "2");
        assert_eq!(eval_with("NOT IS_DEFINED(a) AND b > 1", &b2), T);
        assert_eq!(
            eval_with("NOT IS_DEFINED(a) AND b > 1", &b2.app("a", "x")),
            F
        );

        // `NOT NOT a = 1` is `NOT (NOT (a = 1))`.
        let a_is_1 = Expr::Compare(CmpOp::Eq, name("a"), number(1.0));
        assert_eq!(parsed("NOT NOT a = 1"), not(not(a_is_1)));
        assert_eq!(eval_with("NOT NOT a = 1", &Msg::default().app("a", "1")), T);
        assert_eq!(eval_with("NOT NOT a = 1", &Msg::default().app("a", "2")), F);
        assert_eq!(eval_empty("NOT NOT a = 1"), U);
    }

    #[test]
    fn display_round_trips() {
        let texts = [
            "a = 'it''s' AND [odd name] != \"q\"",
            "$body.a[3]['x y'].b >= -2.5e3 OR NOT IS_NULL($body)",
            "STARTS_WITH(LOWER($connectionDeviceId), 'sensor') AND LENGTH([and]) < 4",
            "null = NULL OR TRUE OR false",
            "NOT x = 'a' AND NOT NOT a = 1 OR NOT IS_DEFINED(a) AND b > 1",
            "(NOT a) = (NOT b) AND LOWER(NOT c) != 'x'",
        ];
        for text in texts {
            let c = Condition::parse(text).unwrap();
            let again = Condition::parse(&c.to_string()).unwrap();
            assert_eq!(c, again, "{text} -> {c}");
        }
    }

    #[test]
    fn uses_body() {
        assert!(!Condition::parse("a = 1 AND $x = 'b'").unwrap().uses_body());
        assert!(Condition::parse("a = 1 OR NOT IS_DEFINED($body.x)")
            .unwrap()
            .uses_body());
        assert!(Condition::parse("LOWER($body) = 'x'").unwrap().uses_body());
    }
}
