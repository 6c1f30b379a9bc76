//! Gate clauses: `exact_match >= 0.95 * teacher.exact_match`.
//!
//! A clause compares two arithmetic expressions over numbers and metric references. A
//! reference is `metric` (the candidate student), `teacher.metric`, or `ALIAS.metric` (the
//! version an alias of the registry points at, e.g. `production.exact_match`). Parsing is
//! done when the spec is validated, so a typo fails before anything is paid for.
//!
//! Invariant: clause text becomes a [`Clause`] in one place, [`Clause::parse`]. Validation
//! calls it for located diagnostics; everything after it (the gate stage's config, its
//! fingerprint, [`crate::gate::evaluate`]) holds typed clauses, which serialize back to
//! their source text so a stage config keeps the spec's shape.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    /// The text the clause was parsed from, as the spec wrote it.
    pub source: String,
    pub lhs: Expr,
    pub op: Comparison,
    pub rhs: Expr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Number(f64),
    Metric(MetricRef),
    Neg(Box<Expr>),
    Binary(Box<Expr>, Operator, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Student,
    Teacher,
    /// The version a registry alias points at.
    Deployed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricRef {
    pub subject: Subject,
    pub metric: String,
    /// Character offset of the reference in the clause text, and its length.
    pub offset: usize,
    pub len: usize,
}

/// A parse error, located within the clause text (character offsets).
#[derive(Debug, Clone, PartialEq)]
pub struct ClauseError {
    pub offset: usize,
    pub len: usize,
    pub message: String,
    pub hint: String,
}

impl Comparison {
    pub fn holds(self, lhs: f64, rhs: f64) -> bool {
        match self {
            Comparison::Ge => lhs >= rhs,
            Comparison::Gt => lhs > rhs,
            Comparison::Le => lhs <= rhs,
            Comparison::Lt => lhs < rhs,
            Comparison::Eq => (lhs - rhs).abs() <= 1e-12 * lhs.abs().max(rhs.abs()).max(1.0),
            Comparison::Ne => (lhs - rhs).abs() > 1e-12 * lhs.abs().max(rhs.abs()).max(1.0),
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::Ge => ">=",
            Comparison::Gt => ">",
            Comparison::Le => "<=",
            Comparison::Lt => "<",
            Comparison::Eq => "==",
            Comparison::Ne => "!=",
        }
    }
}

impl fmt::Display for MetricRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Subject::Student => write!(f, "{}", self.metric),
            Subject::Teacher => write!(f, "teacher.{}", self.metric),
            Subject::Deployed(alias) => write!(f, "{alias}.{}", self.metric),
        }
    }
}

impl Clause {
    pub fn parse(text: &str) -> Result<Clause, ClauseError> {
        let tokens = lex(text)?;
        let mut parser = ClauseParser { tokens, pos: 0, len: text.chars().count() };
        let lhs = parser.expr()?;
        let op = match parser.next() {
            Some(Token { kind: Kind::Cmp(op), .. }) => op,
            Some(t) => return Err(parser.unexpected(&t, "a comparison (`>=`, `<=`, `>`, `<`, `==`, `!=`)")),
            None => {
                return Err(ClauseError {
                    offset: parser.len,
                    len: 1,
                    message: "the clause has no comparison".into(),
                    hint: "a clause compares two sides, e.g. `exact_match >= 0.9`".into(),
                })
            }
        };
        let rhs = parser.expr()?;
        if let Some(t) = parser.next() {
            return Err(parser.unexpected(&t, "the end of the clause"));
        }
        Ok(Clause { source: text.to_string(), lhs, op, rhs })
    }

    /// Whether the clause reads a version a registry alias points at.
    pub fn reads_deployed(&self) -> bool {
        self.references().iter().any(|r| matches!(r.subject, Subject::Deployed(_)))
    }

    /// Every metric the clause reads, in order of appearance.
    pub fn references(&self) -> Vec<&MetricRef> {
        let mut refs = Vec::new();
        collect_refs(&self.lhs, &mut refs);
        collect_refs(&self.rhs, &mut refs);
        refs
    }
}

impl Serialize for Clause {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Clause {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Clause::parse(&text).map_err(|e| {
            serde::de::Error::custom(format!("cannot parse gate clause `{text}`: {}; hint: {}", e.message, e.hint))
        })
    }
}

fn collect_refs<'e>(expr: &'e Expr, out: &mut Vec<&'e MetricRef>) {
    match expr {
        Expr::Number(_) => {}
        Expr::Metric(r) => out.push(r),
        Expr::Neg(e) => collect_refs(e, out),
        Expr::Binary(a, _, b) => {
            collect_refs(a, out);
            collect_refs(b, out);
        }
    }
}

impl Expr {
    /// Evaluates with metric values from `lookup`; `Err` names the first missing metric.
    pub fn evaluate(&self, lookup: &dyn Fn(&MetricRef) -> Option<f64>) -> Result<f64, MetricRef> {
        Ok(match self {
            Expr::Number(x) => *x,
            Expr::Metric(r) => lookup(r).ok_or_else(|| r.clone())?,
            Expr::Neg(e) => -e.evaluate(lookup)?,
            Expr::Binary(a, op, b) => {
                let (a, b) = (a.evaluate(lookup)?, b.evaluate(lookup)?);
                match op {
                    Operator::Add => a + b,
                    Operator::Sub => a - b,
                    Operator::Mul => a * b,
                    Operator::Div => a / b,
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Number(f64),
    Ident(String),
    Dot,
    Op(Operator),
    Cmp(Comparison),
    Open,
    Close,
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    kind: Kind,
    offset: usize,
    len: usize,
}

fn lex(text: &str) -> Result<Vec<Token>, ClauseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let single = |kind| Token { kind, offset: start, len: 1 };
        match c {
            c if c.is_whitespace() => i += 1,
            '0'..='9' => {
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.' || chars[i] == '_') {
                    i += 1;
                }
                // An exponent: 2.0e-4
                if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                    let mut j = i + 1;
                    if j < chars.len() && (chars[j] == '-' || chars[j] == '+') {
                        j += 1;
                    }
                    if j < chars.len() && chars[j].is_ascii_digit() {
                        i = j;
                        while i < chars.len() && chars[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
                let literal: String = chars[start..i].iter().filter(|&&c| c != '_').collect();
                let value = literal.parse::<f64>().map_err(|_| ClauseError {
                    offset: start,
                    len: i - start,
                    message: format!("`{literal}` is not a number"),
                    hint: "write numbers like `0.95`, `200` or `2e-4`".into(),
                })?;
                tokens.push(Token { kind: Kind::Number(value), offset: start, len: i - start });
            }
            c if c.is_alphabetic() || c == '_' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token {
                    kind: Kind::Ident(chars[start..i].iter().collect()),
                    offset: start,
                    len: i - start,
                });
            }
            '.' => {
                tokens.push(single(Kind::Dot));
                i += 1;
            }
            '+' => {
                tokens.push(single(Kind::Op(Operator::Add)));
                i += 1;
            }
            '-' => {
                tokens.push(single(Kind::Op(Operator::Sub)));
                i += 1;
            }
            '*' => {
                tokens.push(single(Kind::Op(Operator::Mul)));
                i += 1;
            }
            '/' => {
                tokens.push(single(Kind::Op(Operator::Div)));
                i += 1;
            }
            '(' => {
                tokens.push(single(Kind::Open));
                i += 1;
            }
            ')' => {
                tokens.push(single(Kind::Close));
                i += 1;
            }
            '>' | '<' | '=' | '!' => {
                let two = chars.get(i + 1) == Some(&'=');
                let op = match (c, two) {
                    ('>', true) => Comparison::Ge,
                    ('>', false) => Comparison::Gt,
                    ('<', true) => Comparison::Le,
                    ('<', false) => Comparison::Lt,
                    ('=', true) => Comparison::Eq,
                    ('!', true) => Comparison::Ne,
                    _ => {
                        return Err(ClauseError {
                            offset: start,
                            len: 1,
                            message: format!("`{c}` is not a comparison"),
                            hint: "compare with `>=`, `<=`, `>`, `<`, `==` or `!=`".into(),
                        })
                    }
                };
                let len = if two { 2 } else { 1 };
                tokens.push(Token { kind: Kind::Cmp(op), offset: start, len });
                i += len;
            }
            other => {
                return Err(ClauseError {
                    offset: start,
                    len: 1,
                    message: format!("unexpected character `{other}`"),
                    hint: "a clause uses metric names, numbers, `+ - * /`, parentheses and one comparison".into(),
                })
            }
        }
    }
    Ok(tokens)
}

struct ClauseParser {
    tokens: Vec<Token>,
    pos: usize,
    len: usize,
}

/// Parenthesised expressions nest at most this deep (the clause parser recurses).
const MAX_NESTING: usize = 32;

impl ClauseParser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn unexpected(&self, t: &Token, expected: &str) -> ClauseError {
        ClauseError {
            offset: t.offset,
            len: t.len,
            message: format!("expected {expected} here"),
            hint: "clauses look like `exact_match >= 0.95 * teacher.exact_match` or `latency_p95_ms <= 200`".into(),
        }
    }

    fn end_error(&self, expected: &str) -> ClauseError {
        ClauseError {
            offset: self.len,
            len: 1,
            message: format!("the clause ends where {expected} was expected"),
            hint: "complete the expression, e.g. `exact_match >= 0.9`".into(),
        }
    }

    fn expr(&mut self) -> Result<Expr, ClauseError> {
        self.sum(0)
    }

    fn sum(&mut self, depth: usize) -> Result<Expr, ClauseError> {
        let mut lhs = self.product(depth)?;
        while let Some(Token { kind: Kind::Op(op @ (Operator::Add | Operator::Sub)), .. }) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.product(depth)?;
            lhs = Expr::Binary(Box::new(lhs), op, Box::new(rhs));
        }
        Ok(lhs)
    }

    fn product(&mut self, depth: usize) -> Result<Expr, ClauseError> {
        let mut lhs = self.factor(depth)?;
        while let Some(Token { kind: Kind::Op(op @ (Operator::Mul | Operator::Div)), .. }) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.factor(depth)?;
            lhs = Expr::Binary(Box::new(lhs), op, Box::new(rhs));
        }
        Ok(lhs)
    }

    fn factor(&mut self, depth: usize) -> Result<Expr, ClauseError> {
        let Some(token) = self.next() else {
            return Err(self.end_error("a number or a metric"));
        };
        if depth > MAX_NESTING {
            return Err(ClauseError {
                offset: token.offset,
                len: token.len,
                message: "the clause nests too deeply".into(),
                hint: "simplify the expression".into(),
            });
        }
        match token.kind {
            Kind::Number(x) => Ok(Expr::Number(x)),
            Kind::Op(Operator::Sub) => Ok(Expr::Neg(Box::new(self.factor(depth + 1)?))),
            Kind::Open => {
                let inner = self.sum(depth + 1)?;
                match self.next() {
                    Some(Token { kind: Kind::Close, .. }) => Ok(inner),
                    Some(t) => Err(self.unexpected(&t, "`)`")),
                    None => Err(self.end_error("`)`")),
                }
            }
            Kind::Ident(first) => {
                if let Some(Token { kind: Kind::Dot, .. }) = self.peek() {
                    self.pos += 1;
                    match self.next() {
                        Some(Token { kind: Kind::Ident(metric), offset, len }) => {
                            let subject = match first.as_str() {
                                "student" => Subject::Student,
                                "teacher" => Subject::Teacher,
                                _ => Subject::Deployed(first),
                            };
                            Ok(Expr::Metric(MetricRef {
                                subject,
                                metric,
                                offset: token.offset,
                                len: offset + len - token.offset,
                            }))
                        }
                        Some(t) => Err(self.unexpected(&t, "a metric name after `.`")),
                        None => Err(self.end_error("a metric name after `.`")),
                    }
                } else {
                    Ok(Expr::Metric(MetricRef {
                        subject: Subject::Student,
                        metric: first,
                        offset: token.offset,
                        len: token.len,
                    }))
                }
            }
            _ => Err(self.unexpected(&token, "a number or a metric")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clause_serializes_as_its_text_and_parses_back() {
        let c = Clause::parse("exact_match >= 0.95 * production.exact_match").expect("parses");
        assert!(c.reads_deployed());
        let json = serde_json::to_string(&c).expect("serializes");
        assert_eq!(json, r#""exact_match >= 0.95 * production.exact_match""#);
        assert_eq!(serde_json::from_str::<Clause>(&json).expect("parses back"), c);
        let err = serde_json::from_str::<Clause>(r#""exact_match => 0.9""#).expect_err("bad operator");
        assert!(err.to_string().contains("cannot parse gate clause `exact_match => 0.9`"), "{err}");
        assert!(!Clause::parse("exact_match >= teacher.exact_match").expect("parses").reads_deployed());
    }

    #[test]
    fn parses_the_design_examples() {
        let c = Clause::parse("exact_match >= 0.95 * teacher.exact_match").expect("parses");
        assert_eq!(c.op, Comparison::Ge);
        let refs = c.references();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].subject, Subject::Teacher);
        assert_eq!((refs[1].offset, refs[1].len), (22, 19));
        let c = Clause::parse("cost_per_1k_usd <= 0.2 * teacher.cost_per_1k_usd").expect("parses");
        assert_eq!(c.references()[0].metric, "cost_per_1k_usd");
        let c = Clause::parse("exact_match >= production.exact_match - 0.01").expect("parses");
        assert_eq!(c.references()[1].subject, Subject::Deployed("production".into()));
    }

    #[test]
    fn evaluates_with_precedence() {
        let c = Clause::parse("a >= 1 + 2 * (3 - b) / 2").expect("parses");
        let lookup = |r: &MetricRef| match r.metric.as_str() {
            "a" => Some(4.0),
            "b" => Some(1.0),
            _ => None,
        };
        let rhs = c.rhs.evaluate(&lookup).expect("known");
        assert_eq!(rhs, 3.0);
        assert!(c.op.holds(c.lhs.evaluate(&lookup).expect("known"), rhs));
    }

    #[test]
    fn errors_point_into_the_clause() {
        let e = Clause::parse("exact_match >=").expect_err("incomplete");
        assert_eq!(e.offset, 14);
        let e = Clause::parse("exact_match => 0.9").expect_err("bad operator");
        assert_eq!((e.offset, e.len), (12, 1));
        let e = Clause::parse("exact_match 0.9").expect_err("no comparison");
        assert_eq!(e.offset, 12);
        let e = Clause::parse("exact_match >= 0.9 >= 1").expect_err("two comparisons");
        assert_eq!(e.offset, 19);
        let e = Clause::parse("exact_match >= teacher.").expect_err("dangling dot");
        assert!(e.message.contains("metric name"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = format!("a >= {}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Clause::parse(&text).is_err());
    }
}
