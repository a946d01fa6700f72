//! Splits route text into tokens, each with its character span.
//!
//! The lexer is pulled one token at a time by the parser, so the first error
//! in the text is the one reported.

use super::condition::{CmpOp, PathStep};
use super::error::RouteError;

/// Words that cannot be used as bare property names (use `[name]`).
pub(crate) const KEYWORDS: &[&str] = &[
    "AND", "OR", "NOT", "TRUE", "FALSE", "NULL", "FROM", "WHERE", "INTO", "THEN",
];

pub(crate) fn is_keyword(word: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

pub(crate) fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

pub(crate) fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `s` is a number in the route language: `-?digits(.digits)?([eE][+-]?digits)?`.
/// Also decides which property strings compare numerically.
pub(crate) fn is_number_text(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let from = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > from
    };
    if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// Parses a number in the route language; `None` when it is not one or is not finite.
pub(crate) fn parse_number(s: &str) -> Option<f64> {
    if !is_number_text(s) {
        return None;
    }
    s.parse::<f64>().ok().filter(|n| n.is_finite())
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// A bare word: keyword, property name or function name.
    Word(String),
    /// `[any name]`: an application property with any characters.
    Bracketed(String),
    /// `$name`, including the `$`.
    SysProp(String),
    /// `$body` and the path after it.
    Body(Vec<PathStep>),
    Str(String),
    Num(f64),
    /// A run of non-blank characters starting with `/` (a source pattern).
    Path(String),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
    Eof,
}

/// A token and its span as 0-based character indices, `end` exclusive.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The 1-based column where the token starts.
    pub fn column(&self) -> usize {
        self.start + 1
    }
}

pub(crate) struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(chars: &'a [char]) -> Self {
        Self { chars, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    fn error(at: usize, message: impl Into<String>) -> RouteError {
        RouteError::at(at + 1, message)
    }

    pub fn next_token(&mut self) -> Result<Token, RouteError> {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(c) = self.peek() else {
            return Ok(Token {
                kind: Kind::Eof,
                start,
                end: start,
            });
        };
        let kind = match c {
            '(' | ')' | ',' | '=' => {
                self.pos += 1;
                match c {
                    '(' => Kind::LParen,
                    ')' => Kind::RParen,
                    ',' => Kind::Comma,
                    _ => Kind::Op(CmpOp::Eq),
                }
            }
            '!' if self.peek_at(1) == Some('=') => self.op(2, CmpOp::Ne),
            '<' => match self.peek_at(1) {
                Some('=') => self.op(2, CmpOp::Le),
                Some('>') => self.op(2, CmpOp::Ne),
                _ => self.op(1, CmpOp::Lt),
            },
            '>' => match self.peek_at(1) {
                Some('=') => self.op(2, CmpOp::Ge),
                _ => self.op(1, CmpOp::Gt),
            },
            '\'' | '"' => Kind::Str(self.string()?),
            '[' => Kind::Bracketed(self.bracketed()?),
            '$' => self.dollar()?,
            '/' => {
                while self.peek().is_some_and(|c| !c.is_whitespace()) {
                    self.pos += 1;
                }
                Kind::Path(self.chars[start..self.pos].iter().collect())
            }
            '-' if self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) => self.number()?,
            c if c.is_ascii_digit() => self.number()?,
            c if is_ident_start(c) => Kind::Word(self.word()),
            c => {
                return Err(Self::error(
                    start,
                    format!("unexpected character '{}'", c.escape_debug()),
                ))
            }
        };
        Ok(Token {
            kind,
            start,
            end: self.pos,
        })
    }

    fn op(&mut self, len: usize, op: CmpOp) -> Kind {
        self.pos += len;
        Kind::Op(op)
    }

    fn word(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// A quoted string at the cursor; the quote character doubled stands for itself.
    fn string(&mut self) -> Result<String, RouteError> {
        let start = self.pos;
        let quote = self.chars[start];
        self.pos += 1;
        let mut value = String::new();
        loop {
            match self.peek() {
                None => return Err(Self::error(start, "unterminated string")),
                Some(c) if c == quote => {
                    if self.peek_at(1) == Some(quote) {
                        value.push(quote);
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                        return Ok(value);
                    }
                }
                Some(c) => {
                    value.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn bracketed(&mut self) -> Result<String, RouteError> {
        let start = self.pos;
        self.pos += 1;
        let name_start = self.pos;
        while self.peek().is_some_and(|c| c != ']') {
            self.pos += 1;
        }
        if self.peek().is_none() {
            return Err(Self::error(start, "unterminated '[' (missing ']')"));
        }
        let name: String = self.chars[name_start..self.pos].iter().collect();
        self.pos += 1;
        if name.is_empty() {
            return Err(Self::error(start, "empty property name '[]'"));
        }
        Ok(name)
    }

    fn dollar(&mut self) -> Result<Kind, RouteError> {
        self.pos += 1;
        let name = self.word();
        if name.is_empty() {
            return Err(Self::error(self.pos, "expected a name after '$'"));
        }
        if name.eq_ignore_ascii_case("body") {
            return self.body_path().map(Kind::Body);
        }
        Ok(Kind::SysProp(format!("${name}")))
    }

    /// The `.field`, `[index]` and `['field']` steps after `$body`.
    fn body_path(&mut self) -> Result<Vec<PathStep>, RouteError> {
        let mut steps = Vec::new();
        loop {
            match self.peek() {
                Some('.') => {
                    self.pos += 1;
                    let name = self.word();
                    if name.is_empty() {
                        return Err(Self::error(self.pos, "expected a field name after '.'"));
                    }
                    steps.push(PathStep::Field(name));
                }
                Some('[') => {
                    let open = self.pos;
                    self.pos += 1;
                    let step = match self.peek() {
                        Some(c) if c.is_ascii_digit() => {
                            let digits = self.word();
                            let index = digits
                                .parse::<usize>()
                                .map_err(|_| Self::error(open + 1, "invalid array index"))?;
                            PathStep::Index(index)
                        }
                        Some('\'' | '"') => PathStep::Field(self.string()?),
                        _ => {
                            return Err(Self::error(
                                self.pos,
                                "expected an array index or a quoted field name",
                            ))
                        }
                    };
                    if self.peek() != Some(']') {
                        return Err(Self::error(self.pos, "expected ']'"));
                    }
                    self.pos += 1;
                    steps.push(step);
                }
                _ => return Ok(steps),
            }
        }
    }

    fn number(&mut self) -> Result<Kind, RouteError> {
        let start = self.pos;
        self.pos += 1;
        while let Some(c) = self.peek() {
            let sign_of_exponent =
                matches!(c, '+' | '-') && matches!(self.chars[self.pos - 1], 'e' | 'E');
            if is_ident_char(c) || c == '.' || sign_of_exponent {
                self.pos += 1;
            } else {
                break;
            }
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        if !is_number_text(&text) {
            return Err(Self::error(start, format!("invalid number '{text}'")));
        }
        parse_number(&text)
            .map(Kind::Num)
            .ok_or_else(|| Self::error(start, format!("number out of range '{text}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(text: &str) -> Result<Vec<(Kind, usize)>, RouteError> {
        let chars: Vec<char> = text.chars().collect();
        let mut lexer = Lexer::new(&chars);
        let mut out = Vec::new();
        loop {
            let t = lexer.next_token()?;
            if t.kind == Kind::Eof {
                return Ok(out);
            }
            out.push((t.kind.clone(), t.column()));
        }
    }

    fn kinds(text: &str) -> Vec<Kind> {
        lex(text).unwrap().into_iter().map(|(k, _)| k).collect()
    }

    fn err(text: &str) -> (usize, String) {
        let e = lex(text).unwrap_err();
        (e.position, e.message)
    }

    #[test]
    fn operators_and_punctuation() {
        use CmpOp::*;
        assert_eq!(
            kinds("= != <> < <= > >= ( ) ,"),
            vec![
                Kind::Op(Eq),
                Kind::Op(Ne),
                Kind::Op(Ne),
                Kind::Op(Lt),
                Kind::Op(Le),
                Kind::Op(Gt),
                Kind::Op(Ge),
                Kind::LParen,
                Kind::RParen,
                Kind::Comma,
            ]
        );
        assert_eq!(kinds("a<=b"), kinds("a <= b"));
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(kinds("'it''s'"), vec![Kind::Str("it's".into())]);
        assert_eq!(
            kinds(r#""say ""hi""""#),
            vec![Kind::Str(r#"say "hi""#.into())]
        );
        assert_eq!(kinds(r#"'a"b' "c'd""#), {
            vec![Kind::Str("a\"b".into()), Kind::Str("c'd".into())]
        });
        assert_eq!(kinds("''"), vec![Kind::Str(String::new())]);
    }

    #[test]
    fn numbers() {
        let nums = |t: &str| match kinds(t).as_slice() {
            [Kind::Num(n)] => *n,
            other => panic!("{other:?}"),
        };
        assert_eq!(nums("42"), 42.0);
        assert_eq!(nums("-3.5"), -3.5);
        assert_eq!(nums("1e3"), 1000.0);
        assert_eq!(nums("2.5E-1"), 0.25);
        assert_eq!(nums("-1e+2"), -100.0);
        assert_eq!(err("1.2.3"), (1, "invalid number '1.2.3'".into()));
        assert_eq!(err("x = 12abc"), (5, "invalid number '12abc'".into()));
        assert_eq!(err("1."), (1, "invalid number '1.'".into()));
        assert_eq!(err("1e"), (1, "invalid number '1e'".into()));
        assert_eq!(err("1e999"), (1, "number out of range '1e999'".into()));
        assert_eq!(err("- 1"), (1, "unexpected character '-'".into()));
    }

    #[test]
    fn names() {
        assert_eq!(
            kinds("temp [alert-level] $connectionDeviceId"),
            vec![
                Kind::Word("temp".into()),
                Kind::Bracketed("alert-level".into()),
                Kind::SysProp("$connectionDeviceId".into()),
            ]
        );
        // A '-' does not continue a bare name.
        assert_eq!(err("alert-level"), (6, "unexpected character '-'".into()));
        assert_eq!(err("[abc"), (1, "unterminated '[' (missing ']')".into()));
        assert_eq!(err("a = []"), (5, "empty property name '[]'".into()));
        assert_eq!(err("$ x"), (2, "expected a name after '$'".into()));
    }

    #[test]
    fn body_paths() {
        use PathStep::*;
        assert_eq!(kinds("$body"), vec![Kind::Body(vec![])]);
        assert_eq!(
            kinds("$body.a[0].b['x-y'][\"z\"]"),
            vec![Kind::Body(vec![
                Field("a".into()),
                Index(0),
                Field("b".into()),
                Field("x-y".into()),
                Field("z".into()),
            ])]
        );
        assert_eq!(kinds("$BODY.a"), vec![Kind::Body(vec![Field("a".into())])]);
        assert_eq!(err("$body."), (7, "expected a field name after '.'".into()));
        assert_eq!(
            err("$body.a[x]"),
            (9, "expected an array index or a quoted field name".into())
        );
        assert_eq!(err("$body.a[0"), (10, "expected ']'".into()));
        assert_eq!(
            err("$body[99999999999999999999999]"),
            (7, "invalid array index".into())
        );
        assert_eq!(err("$body['a"), (7, "unterminated string".into()));
    }

    #[test]
    fn paths_run_to_whitespace() {
        assert_eq!(
            lex("FROM /messages/* WHERE").unwrap(),
            vec![
                (Kind::Word("FROM".into()), 1),
                (Kind::Path("/messages/*".into()), 6),
                (Kind::Word("WHERE".into()), 18),
            ]
        );
    }

    #[test]
    fn errors_point_at_the_character() {
        assert_eq!(err("a = 'abc"), (5, "unterminated string".into()));
        assert_eq!(err("a # b"), (3, "unexpected character '#'".into()));
        assert_eq!(err("a ! b"), (3, "unexpected character '!'".into()));
        assert_eq!(err("é ü \u{0}"), (5, "unexpected character '\\0'".into()));
    }

    #[test]
    fn number_text() {
        for ok in ["0", "-0", "12", "1.5", "1e5", "1E+5", "-2.5e-3", "007"] {
            assert!(is_number_text(ok), "{ok}");
        }
        for bad in [
            "", "-", "+1", "1.", ".5", "1e", "1e+", " 1", "1 ", "NaN", "inf", "0x10",
        ] {
            assert!(!is_number_text(bad), "{bad}");
        }
        assert_eq!(parse_number("1e400"), None);
    }
}
