//! Parses route text, `FROM <source> [WHERE <condition>] INTO <sink>`, and
//! conditions and sinks on their own.
//!
//! Recursive descent with one token of lookahead. Precedence, tightest
//! first, as in SQL: operands and function calls, comparison, NOT, AND, OR.
//! So `NOT a = 1` is `NOT (a = 1)`, and `NOT a AND b` is `(NOT a) AND b`.
//! Comparisons do not chain (`a = b = c` is an error), and a comparison
//! operand cannot start with NOT (`a = NOT b` is an error; write
//! `a = (NOT b)`). Nesting is bounded so that no input can exhaust the stack.

use super::condition::{Condition, Expr, Function, Literal};
use super::error::RouteError;
use super::lexer::{is_keyword, Kind, Lexer, Token};
use super::sink::{self, Sink};
use super::source::{self, PathError, SourcePattern};

/// How deeply parentheses, NOT, function calls and THEN chains may nest.
const MAX_DEPTH: usize = 32;

/// How much of an unexpected token an error message quotes.
const MAX_QUOTED: usize = 40;

const SINK: &str = "a sink ($upstream, BrokeredEndpoint(\"...\") or plugin(\"...\"))";

/// The parts of a route.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub source: SourcePattern,
    pub condition: Option<Condition>,
    pub sink: Sink,
}

pub(crate) fn parse_route(text: &str) -> Result<Parsed, RouteError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser::new(&chars, "empty route")?;
    if !p.eat_keyword("FROM")? {
        return Err(p.unexpected("FROM"));
    }
    let source = p.source()?;
    let condition = if p.eat_keyword("WHERE")? {
        Some(Condition::new(p.or_expr()?))
    } else {
        None
    };
    if !p.eat_keyword("INTO")? {
        return Err(p.unexpected(if condition.is_some() {
            "INTO"
        } else {
            "WHERE or INTO"
        }));
    }
    let sink = p.sink()?;
    p.finish("the sink")?;
    Ok(Parsed {
        source,
        condition,
        sink,
    })
}

pub(crate) fn parse_condition(text: &str) -> Result<Condition, RouteError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser::new(&chars, "empty condition")?;
    let expr = p.or_expr()?;
    p.finish("the condition")?;
    Ok(Condition::new(expr))
}

pub(crate) fn parse_sink(text: &str) -> Result<Sink, RouteError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser::new(&chars, "empty sink")?;
    let sink = p.sink()?;
    p.finish("the sink")?;
    Ok(sink)
}

struct Parser<'a> {
    chars: &'a [char],
    lexer: Lexer<'a>,
    /// The current (not yet consumed) token.
    tok: Token,
    depth: usize,
}

impl<'a> Parser<'a> {
    /// Fails with `empty` (at column 1) when the text is blank.
    fn new(chars: &'a [char], empty: &str) -> Result<Self, RouteError> {
        if chars.iter().all(|c| c.is_whitespace()) {
            return Err(RouteError::at(1, empty));
        }
        let mut lexer = Lexer::new(chars);
        let tok = lexer.next_token()?;
        Ok(Self {
            chars,
            lexer,
            tok,
            depth: 0,
        })
    }

    /// Moves to the next token, returning the one consumed.
    fn advance(&mut self) -> Result<Token, RouteError> {
        let next = self.lexer.next_token()?;
        Ok(std::mem::replace(&mut self.tok, next))
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.tok.kind, Kind::Word(w) if w.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> Result<bool, RouteError> {
        if self.is_keyword(keyword) {
            self.advance()?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn expect(&mut self, kind: Kind, what: &str) -> Result<Token, RouteError> {
        if self.tok.kind == kind {
            self.advance()
        } else {
            Err(self.unexpected(what))
        }
    }

    /// An error at the current token.
    fn error(&self, message: impl Into<String>) -> RouteError {
        RouteError::at(self.tok.column(), message)
    }

    /// The current token as written, for messages.
    fn found(&self) -> String {
        if self.tok.kind == Kind::Eof {
            return "end of text".into();
        }
        let raw = &self.chars[self.tok.start..self.tok.end];
        let mut shown: String = raw.iter().take(MAX_QUOTED).collect();
        if raw.len() > MAX_QUOTED {
            shown.push_str("...");
        }
        if matches!(self.tok.kind, Kind::Str(_)) {
            shown // already quoted
        } else {
            format!("'{shown}'")
        }
    }

    fn unexpected(&self, expected: &str) -> RouteError {
        self.error(format!("expected {expected}, found {}", self.found()))
    }

    /// Fails unless the whole text has been read.
    fn finish(&self, after: &str) -> Result<(), RouteError> {
        match self.tok.kind {
            Kind::Eof => Ok(()),
            _ if self.is_keyword("THEN") => Err(self.error("THEN may only follow plugin(...)")),
            _ => Err(self.error(format!("unexpected {} after {after}", self.found()))),
        }
    }

    fn enter(&mut self) -> Result<(), RouteError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(format!("nested too deeply (more than {MAX_DEPTH} levels)")));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Maps an error inside a string token to a column, counting a doubled
    /// quote as the two characters it is written with.
    fn string_error(&self, tok: &Token, (offset, message): PathError) -> RouteError {
        let quote = self.chars[tok.start];
        let mut raw = tok.start + 1;
        for _ in 0..offset {
            raw += if self.chars.get(raw) == Some(&quote) {
                2
            } else {
                1
            };
        }
        RouteError::at(raw + 1, message)
    }

    fn source(&mut self) -> Result<SourcePattern, RouteError> {
        let Kind::Path(path) = &self.tok.kind else {
            return Err(self.unexpected("a source path such as /messages/*"));
        };
        // A path token has no escapes: offsets map straight to columns.
        source::validate(path)
            .map_err(|(offset, message)| RouteError::at(self.tok.start + offset + 1, message))?;
        let pattern = SourcePattern::new_unchecked(path);
        self.advance()?;
        Ok(pattern)
    }

    fn or_expr(&mut self) -> Result<Expr, RouteError> {
        let first = self.and_expr()?;
        if !self.is_keyword("OR") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_keyword("OR")? {
            items.push(self.and_expr()?);
        }
        Ok(Expr::Or(items))
    }

    fn and_expr(&mut self) -> Result<Expr, RouteError> {
        let first = self.not_expr()?;
        if !self.is_keyword("AND") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_keyword("AND")? {
            items.push(self.not_expr()?);
        }
        Ok(Expr::And(items))
    }

    /// `NOT` applies to everything up to the next AND or OR, comparison
    /// included; it may repeat (`NOT NOT a = 1`).
    fn not_expr(&mut self) -> Result<Expr, RouteError> {
        if !self.is_keyword("NOT") {
            return self.comparison();
        }
        self.enter()?;
        self.advance()?;
        let inner = self.not_expr()?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn comparison(&mut self) -> Result<Expr, RouteError> {
        let left = self.operand()?;
        let Kind::Op(op) = self.tok.kind else {
            return Ok(left);
        };
        self.advance()?;
        let right = self.operand()?;
        if let Kind::Op(_) = self.tok.kind {
            return Err(self.error("comparisons cannot be chained; add parentheses"));
        }
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    fn operand(&mut self) -> Result<Expr, RouteError> {
        let expr = match &self.tok.kind {
            Kind::Num(n) => Expr::Literal(Literal::Number(*n)),
            Kind::Str(s) => Expr::Literal(Literal::String(s.clone())),
            Kind::Bracketed(name) => Expr::AppProperty(name.clone()),
            Kind::SysProp(name) => Expr::SystemProperty(name.clone()),
            Kind::Body(path) => Expr::Body(path.clone()),
            Kind::Word(w) if w.eq_ignore_ascii_case("true") => Expr::Literal(Literal::Bool(true)),
            Kind::Word(w) if w.eq_ignore_ascii_case("false") => Expr::Literal(Literal::Bool(false)),
            Kind::Word(w) if w.eq_ignore_ascii_case("null") => Expr::Literal(Literal::Null),
            Kind::Word(w) if !is_keyword(w) => {
                let name = self.advance()?;
                return if self.tok.kind == Kind::LParen {
                    self.call(&name)
                } else {
                    Ok(Expr::AppProperty(self.text(&name)))
                };
            }
            Kind::LParen => {
                self.enter()?;
                self.advance()?;
                let inner = self.or_expr()?;
                self.expect(Kind::RParen, "')'")?;
                self.leave();
                return Ok(inner);
            }
            _ => return Err(self.unexpected("an operand")),
        };
        self.advance()?;
        Ok(expr)
    }

    fn text(&self, tok: &Token) -> String {
        self.chars[tok.start..tok.end].iter().collect()
    }

    /// A function call; the current token is the `(` after the name.
    fn call(&mut self, name: &Token) -> Result<Expr, RouteError> {
        let written = self.text(name);
        let Some(func) = Function::from_name(&written) else {
            return Err(RouteError::at(
                name.column(),
                format!("unknown function '{written}'"),
            ));
        };
        let arity = func.arity();
        let plural = if arity == 1 { "" } else { "s" };
        self.enter()?;
        self.advance()?;
        let mut args = Vec::new();
        if self.tok.kind != Kind::RParen {
            loop {
                if args.len() == arity {
                    return Err(self.error(format!(
                        "too many arguments: {} takes {arity} argument{plural}",
                        func.name()
                    )));
                }
                args.push(self.or_expr()?);
                match self.tok.kind {
                    Kind::Comma => {
                        self.advance()?;
                    }
                    Kind::RParen => break,
                    _ => return Err(self.unexpected("',' or ')'")),
                }
            }
        }
        if args.len() < arity {
            return Err(self.error(format!(
                "too few arguments: {} takes {arity} argument{plural}",
                func.name()
            )));
        }
        self.advance()?;
        self.leave();
        Ok(Expr::Call(func, args))
    }

    fn sink(&mut self) -> Result<Sink, RouteError> {
        match &self.tok.kind {
            Kind::SysProp(name) if name.eq_ignore_ascii_case("$upstream") => {
                self.advance()?;
                Ok(Sink::Upstream)
            }
            Kind::Word(w) if w.eq_ignore_ascii_case("BrokeredEndpoint") => {
                let (module, input) =
                    self.quoted_argument("a quoted endpoint path", sink::parse_endpoint)?;
                Ok(Sink::ModuleInput { module, input })
            }
            Kind::Word(w) if w.eq_ignore_ascii_case("plugin") => {
                let name = self.quoted_argument("a quoted plugin name", |name| {
                    sink::validate_plugin_name(name).map(|()| name.to_string())
                })?;
                let then = if self.is_keyword("THEN") {
                    self.enter()?;
                    self.advance()?;
                    let next = self.sink()?;
                    self.leave();
                    Some(Box::new(next))
                } else {
                    None
                };
                Ok(Sink::Plugin { name, then })
            }
            _ => Err(self.unexpected(SINK)),
        }
    }

    /// Consumes `name ( "string" )`, checking the string with `check`
    /// before anything after it is read, so that its errors come first.
    fn quoted_argument<T>(
        &mut self,
        what: &str,
        check: impl FnOnce(&str) -> Result<T, PathError>,
    ) -> Result<T, RouteError> {
        self.advance()?;
        self.expect(Kind::LParen, "'('")?;
        let Kind::Str(value) = &self.tok.kind else {
            return Err(self.unexpected(what));
        };
        let checked = check(value).map_err(|e| self.string_error(&self.tok, e))?;
        self.advance()?;
        self.expect(Kind::RParen, "')'")?;
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> Parsed {
        parse_route(text).unwrap_or_else(|e| panic!("{text}: {e}\n{}", e.render(text)))
    }

    fn error(text: &str) -> (usize, String) {
        match parse_route(text) {
            Ok(_) => panic!("{text} parsed"),
            Err(e) => (e.position, e.message),
        }
    }

    #[test]
    fn routes_of_every_form() {
        let r = route("FROM /messages/* INTO $upstream");
        assert_eq!(r.source.as_str(), "/messages/*");
        assert!(r.condition.is_none());
        assert_eq!(r.sink, Sink::Upstream);

        let r = route("from /messages/modules/m1/outputs/o1 where temp > 30 into BrokeredEndpoint(\"/modules/m2/inputs/in\")");
        assert_eq!(r.source.as_str(), "/messages/modules/m1/outputs/o1");
        assert_eq!(r.condition.unwrap().to_string(), "(temp > 30)");
        assert_eq!(
            r.sink,
            Sink::ModuleInput {
                module: "m2".into(),
                input: "in".into()
            }
        );

        let r = route(
            "  FROM /* WHERE $body.a[0].b = 'x' AND IS_DEFINED([alert-level])\n  INTO plugin('f') THEN $upstream  ",
        );
        assert!(r.condition.unwrap().uses_body());
        assert_eq!(r.sink.to_string(), "plugin(\"f\") THEN $upstream");

        let r = route("FROM /messages/devices/d1 WHERE (((a = 1))) INTO $upstream");
        assert_eq!(r.condition.unwrap().to_string(), "(a = 1)");
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let a = route("FROM /* WHERE NOT a = 1 AND b = 2 OR c INTO $upstream");
        let b = route("From /* wHeRe not a = 1 and b = 2 or c iNtO $Upstream");
        assert_eq!(a.condition, b.condition);
        assert_eq!(a.sink, b.sink);
    }

    #[test]
    fn errors_point_at_the_right_column() {
        let sink_msg = |found: &str| format!("expected {SINK}, found {found}");
        let cases: Vec<(&str, usize, String)> = vec![
            ("", 1, "empty route".into()),
            ("   \t ", 1, "empty route".into()),
            (
                "SELECT * FROM /*",
                1,
                "expected FROM, found 'SELECT'".into(),
            ),
            (
                "FROM",
                5,
                "expected a source path such as /messages/*, found end of text".into(),
            ),
            (
                "FROM messages/* INTO $upstream",
                6,
                "expected a source path such as /messages/*, found 'messages'".into(),
            ),
            (
                "FROM /messages/* INT $upstream",
                18,
                "expected WHERE or INTO, found 'INT'".into(),
            ),
            (
                "FROM /messages/* WHERE a = 1 INT $upstream",
                30,
                "expected INTO, found 'INT'".into(),
            ),
            (
                "FROM /messages/*",
                17,
                "expected WHERE or INTO, found end of text".into(),
            ),
            (
                "FROM /messages/* WHERE a = 1",
                29,
                "expected INTO, found end of text".into(),
            ),
            (
                "FROM /messages/* WHERE INTO $upstream",
                24,
                "expected an operand, found 'INTO'".into(),
            ),
            (
                "FROM /messages/* WHERE a = 'abc INTO $upstream",
                28,
                "unterminated string".into(),
            ),
            (
                "FROM /messages/* WHERE a = \"abc INTO $upstream",
                28,
                "unterminated string".into(),
            ),
            (
                "FROM /* WHERE FOO(a) INTO $upstream",
                15,
                "unknown function 'FOO'".into(),
            ),
            (
                "FROM /* WHERE STARTS_WITH(a) INTO $upstream",
                28,
                "too few arguments: STARTS_WITH takes 2 arguments".into(),
            ),
            (
                "FROM /* WHERE lower(a, 'b') INTO $upstream",
                24,
                "too many arguments: LOWER takes 1 argument".into(),
            ),
            (
                "FROM /* WHERE IS_DEFINED() INTO $upstream",
                26,
                "too few arguments: IS_DEFINED takes 1 argument".into(),
            ),
            (
                "FROM /* WHERE CONTAINS(a 'b') INTO $upstream",
                26,
                "expected ',' or ')', found 'b'".into(),
            ),
            (
                "FROM /* WHERE (a = 1 INTO $upstream",
                22,
                "expected ')', found 'INTO'".into(),
            ),
            (
                "FROM /* WHERE a = 1) INTO $upstream",
                20,
                "expected INTO, found ')'".into(),
            ),
            (
                "FROM /* WHERE a = b = c INTO $upstream",
                21,
                "comparisons cannot be chained; add parentheses".into(),
            ),
            (
                "FROM /* WHERE a = NOT b INTO $upstream",
                19,
                "expected an operand, found 'NOT'".into(),
            ),
            (
                "FROM /* WHERE a == 1 INTO $upstream",
                18,
                "expected an operand, found '='".into(),
            ),
            (
                "FROM /* WHERE a = 1 AND INTO $upstream",
                25,
                "expected an operand, found 'INTO'".into(),
            ),
            (
                "FROM /* WHERE alert-level = 1 INTO $upstream",
                20,
                "unexpected character '-'".into(),
            ),
            (
                "FROM /* WHERE a & b INTO $upstream",
                17,
                "unexpected character '&'".into(),
            ),
            ("FROM /* WHERE a = 1 INTO", 25, sink_msg("end of text")),
            (
                "FROM /* WHERE a = 1 INTO upstream",
                26,
                sink_msg("'upstream'"),
            ),
            (
                "FROM /* INTO $upstream trailing",
                24,
                "unexpected 'trailing' after the sink".into(),
            ),
            (
                "FROM /* INTO $upstream THEN $upstream",
                24,
                "THEN may only follow plugin(...)".into(),
            ),
            (
                "FROM /messages/modules/m1/inputs/x INTO $upstream",
                27,
                "expected 'outputs' or '*' after the module id".into(),
            ),
            (
                "FROM /messages/devices/d1/* /x INTO $upstream",
                29,
                "expected WHERE or INTO, found '/x'".into(),
            ),
            (
                "FROM /messages/modules/m1/outputs/o1/* INTO $upstream",
                38,
                "unexpected segment after the output name".into(),
            ),
            (
                "FROM /* INTO BrokeredEndpoint(\"/modules/m/inputs\")",
                49,
                "expected an input name after 'inputs'".into(),
            ),
            (
                "FROM /* INTO BrokeredEndpoint('/modules/m/in/i')",
                43,
                "expected 'inputs' after the module id".into(),
            ),
            (
                "FROM /* INTO BrokeredEndpoint('/modules/m/inputs/i'",
                52,
                "expected ')', found end of text".into(),
            ),
            (
                "FROM /* INTO plugin(\"bad name\")",
                25,
                "plugin names may only have letters, digits, '-', '_' and '.'".into(),
            ),
            (
                "FROM /* WHERE $body. = 1 INTO $upstream",
                21,
                "expected a field name after '.'".into(),
            ),
            (
                "FROM /* WHERE [x = 1 INTO $upstream",
                15,
                "unterminated '[' (missing ']')".into(),
            ),
            (
                "FROM /* WHERE a = 1e999 INTO $upstream",
                19,
                "number out of range '1e999'".into(),
            ),
            (
                "FROM /*\nWHERE a = 1\nINT $upstream",
                21,
                "expected INTO, found 'INT'".into(),
            ),
        ];
        for (text, position, message) in cases {
            assert_eq!(error(text), (position, message), "{text}");
        }
    }

    #[test]
    fn the_first_error_wins() {
        // A bad source is reported even though a later string is unterminated.
        assert_eq!(
            error("FROM /foo WHERE 'abc"),
            (
                7,
                "a source pattern must start with '/messages' (or be '/*')".into()
            )
        );
        // A bad endpoint is reported before the missing ')'.
        assert_eq!(error("FROM /* INTO BrokeredEndpoint('/x' ").0, 33);
    }

    #[test]
    fn long_unexpected_tokens_are_shortened() {
        let x = |n: usize| "x".repeat(n);
        let text = format!("FROM /* INTO $upstream {}", x(100));
        let want = format!("unexpected '{}...' after the sink", x(40));
        assert_eq!(error(&text), (24, want));
        // Strings are shown with their own quotes.
        let text = format!("FROM /* INTO $upstream '{}'", x(100));
        let want = format!("unexpected '{}... after the sink", x(39));
        assert_eq!(error(&text), (24, want));
        assert_eq!(
            error("FROM /* INTO $upstream \"s\"").1,
            "unexpected \"s\" after the sink"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |open: &str, n: usize| {
            format!(
                "FROM /* WHERE {}a{} INTO $upstream",
                open.repeat(n),
                ")".repeat(n)
            )
        };
        assert!(parse_route(&deep("(", 30)).is_ok());
        assert!(parse_route(&deep("LOWER(", 30)).is_ok());
        for open in ["(", "LOWER(", "NOT ("] {
            let e = parse_route(&deep(open, 100_000)).unwrap_err();
            assert!(e.message.starts_with("nested too deeply"), "{e}");
        }
        let nots = format!("FROM /* WHERE {}a INTO $upstream", "NOT ".repeat(100_000));
        assert!(parse_route(&nots).is_err());
        // Long flat chains are fine: they do not nest.
        let chain = format!(
            "FROM /* WHERE {} INTO $upstream",
            vec!["a = 1"; 10_000].join(" AND ")
        );
        assert!(parse_route(&chain).is_ok());
    }
}
