//! The small expression language of metric specs: `amount * stage.probability`,
//! `stage == 'won'`, `days_between(created_at, entered_at('won'))`.
//!
//! No SQL text ever comes from a spec. An expression is parsed here into a tree; names resolve
//! only to fields of the compiled model (see [`crate::lower`]) and functions only to the
//! allow-list in [`FUNCTIONS`]; literals become bound parameters.

use rust_decimal::Decimal;
use std::str::FromStr;

/// The functions an expression may call.
pub const FUNCTIONS: [&str; 5] = ["abs", "coalesce", "days_between", "entered_at", "round"];

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A number literal.
    Num(Decimal),
    /// A text literal (`'won'`).
    Str(String),
    /// `true` / `false`.
    Bool(bool),
    /// `null`.
    Null,
    /// A field path: `amount`, `account.industry`, `stage.probability`.
    Path(Vec<String>),
    /// A call of an allow-listed function.
    Call(String, Vec<Expr>),
    /// `-x` or `not x`.
    Unary(UnOp, Box<Expr>),
    /// `a op b`.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `x in ['a', 'b']`.
    In(Box<Expr>, Vec<Expr>),
    /// `x is null` (`false`) / `x is not null` (`true`).
    IsNull(Box<Expr>, bool),
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// Arithmetic negation.
    Neg,
    /// Logical negation.
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (never integer division; division by zero is null)
    Div,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `and`
    And,
    /// `or`
    Or,
}

impl BinOp {
    /// The SQL spelling of a comparison or logical operator.
    pub fn sql(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Eq => "=",
            BinOp::Ne => "<>",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "AND",
            BinOp::Or => "OR",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Decimal),
    Str(String),
    Ident(String),
    Op(&'static str),
}

const MAX_LEN: usize = 2000;
const MAX_DEPTH: usize = 32;

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    if src.len() > MAX_LEN {
        return Err(format!("is longer than {MAX_LEN} characters"));
    }
    let chars: Vec<char> = src.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n = Decimal::from_str(&text).map_err(|_| format!("`{text}` is not a number"))?;
            out.push(Tok::Num(n));
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("has a text literal without its closing quote".into()),
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = ["==", "!=", "<=", ">="]
                .into_iter()
                .find(|o| *o == two)
                .or_else(|| {
                    ["+", "-", "*", "/", "<", ">", "(", ")", ",", ".", "[", "]"]
                        .into_iter()
                        .find(|o| o.starts_with(c))
                })
                .ok_or_else(|| format!("has an unexpected character `{c}`"))?;
            i += op.len();
            out.push(Tok::Op(op));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

/// Parse an expression; the error is a sentence fragment ("has an unexpected …").
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
        depth: 0,
    };
    if p.toks.is_empty() {
        return Err("is empty".into());
    }
    let e = p.or()?;
    match p.toks.get(p.pos) {
        None => Ok(e),
        Some(t) => Err(format!("has unexpected {} after the expression", show(t))),
    }
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Num(n) => format!("`{n}`"),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Op(o) => format!("`{o}`"),
    }
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Ident(s)) if s == w)
    }
    fn expect_op(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op(op) {
            self.pos += 1;
            Ok(())
        } else {
            Err(match self.toks.get(self.pos) {
                Some(t) => format!("expected `{op}` but found {}", show(t)),
                None => format!("ends early: expected `{op}`"),
            })
        }
    }
    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(format!("nests deeper than {MAX_DEPTH} levels"))
        } else {
            Ok(())
        }
    }
    fn or(&mut self) -> Result<Expr, String> {
        self.nest()?;
        let mut l = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            let r = self.and()?;
            l = Expr::Binary(BinOp::Or, Box::new(l), Box::new(r));
        }
        self.depth -= 1;
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.not()?;
        while self.peek_word("and") {
            self.pos += 1;
            let r = self.not()?;
            l = Expr::Binary(BinOp::And, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if self.peek_word("not") {
            self.pos += 1;
            self.nest()?;
            let e = self.not()?;
            self.depth -= 1;
            return Ok(Expr::Unary(UnOp::Not, Box::new(e)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let l = self.add()?;
        let op = match self.toks.get(self.pos) {
            Some(Tok::Op("==")) => BinOp::Eq,
            Some(Tok::Op("!=")) => BinOp::Ne,
            Some(Tok::Op("<")) => BinOp::Lt,
            Some(Tok::Op("<=")) => BinOp::Le,
            Some(Tok::Op(">")) => BinOp::Gt,
            Some(Tok::Op(">=")) => BinOp::Ge,
            Some(Tok::Ident(w)) if w == "in" => {
                self.pos += 1;
                self.expect_op("[")?;
                let mut items = vec![];
                while !self.peek_op("]") {
                    items.push(self.primary()?);
                    if !self.peek_op("]") {
                        self.expect_op(",")?;
                    }
                }
                self.pos += 1;
                if items.is_empty() {
                    return Err("has an empty `in [...]` list".into());
                }
                return Ok(Expr::In(Box::new(l), items));
            }
            Some(Tok::Ident(w)) if w == "is" => {
                self.pos += 1;
                let not = self.peek_word("not");
                if not {
                    self.pos += 1;
                }
                if !self.peek_word("null") {
                    return Err("expected `null` after `is`".into());
                }
                self.pos += 1;
                return Ok(Expr::IsNull(Box::new(l), not));
            }
            _ => return Ok(l),
        };
        self.pos += 1;
        let r = self.add()?;
        Ok(Expr::Binary(op, Box::new(l), Box::new(r)))
    }
    fn add(&mut self) -> Result<Expr, String> {
        let mut l = self.mul()?;
        loop {
            let op = if self.peek_op("+") {
                BinOp::Add
            } else if self.peek_op("-") {
                BinOp::Sub
            } else {
                return Ok(l);
            };
            self.pos += 1;
            let r = self.mul()?;
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
    }
    fn mul(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        loop {
            let op = if self.peek_op("*") {
                BinOp::Mul
            } else if self.peek_op("/") {
                BinOp::Div
            } else {
                return Ok(l);
            };
            self.pos += 1;
            let r = self.unary()?;
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_op("-") {
            self.pos += 1;
            self.nest()?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Unary(UnOp::Neg, Box::new(e)));
        }
        self.primary()
    }
    fn primary(&mut self) -> Result<Expr, String> {
        let Some(t) = self.toks.get(self.pos).cloned() else {
            return Err("ends early: expected a value".into());
        };
        self.pos += 1;
        match t {
            Tok::Num(n) => Ok(Expr::Num(n)),
            Tok::Str(s) => Ok(Expr::Str(s)),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect_op(")")?;
                Ok(e)
            }
            Tok::Ident(w) => match w.as_str() {
                "true" => Ok(Expr::Bool(true)),
                "false" => Ok(Expr::Bool(false)),
                "null" => Ok(Expr::Null),
                "and" | "or" | "not" | "in" | "is" => {
                    Err(format!("has `{w}` where a value was expected"))
                }
                _ if self.peek_op("(") => {
                    self.pos += 1;
                    let mut args = vec![];
                    while !self.peek_op(")") {
                        args.push(self.or()?);
                        if !self.peek_op(")") {
                            self.expect_op(",")?;
                        }
                    }
                    self.pos += 1;
                    if !FUNCTIONS.contains(&w.as_str()) {
                        return Err(format!(
                            "calls `{w}`, which is not a function; use one of: {}",
                            FUNCTIONS.join(", ")
                        ));
                    }
                    Ok(Expr::Call(w, args))
                }
                _ => {
                    let mut path = vec![w];
                    while self.peek_op(".") {
                        self.pos += 1;
                        match self.toks.get(self.pos) {
                            Some(Tok::Ident(s)) => {
                                path.push(s.clone());
                                self.pos += 1;
                            }
                            _ => return Err("has a `.` not followed by a field name".into()),
                        }
                    }
                    Ok(Expr::Path(path))
                }
            },
            other => Err(format!("has unexpected {}", show(&other))),
        }
    }
}

/// The metric names an expression refers to (for derived metrics).
pub fn names(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::Path(p) => out.push(p.join(".")),
        Expr::Call(_, args) => args.iter().for_each(|a| names(a, out)),
        Expr::Unary(_, a) | Expr::IsNull(a, _) => names(a, out),
        Expr::Binary(_, a, b) => {
            names(a, out);
            names(b, out);
        }
        Expr::In(a, items) => {
            names(a, out);
            items.iter().for_each(|i| names(i, out));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precedence_and_paths() {
        let e = parse("amount * stage.probability + 1").unwrap();
        let Expr::Binary(BinOp::Add, l, _) = e else {
            panic!("{e:?}")
        };
        assert!(matches!(*l, Expr::Binary(BinOp::Mul, _, _)));
        assert!(matches!(
            parse("not stage in ['won', 'lost'] and amount is not null").unwrap(),
            Expr::Binary(BinOp::And, _, _)
        ));
        assert_eq!(
            parse("'it''s'").unwrap(),
            Expr::Str("it's".into()),
            "quotes double inside text"
        );
    }

    #[test]
    fn refuses_bad_input() {
        for (src, msg) in [
            ("", "is empty"),
            ("amount +", "ends early"),
            ("drop_table(x)", "not a function"),
            ("amount; DROP TABLE x", "unexpected character `;`"),
            ("'open", "closing quote"),
            ("a b", "unexpected `b`"),
            ("x in []", "empty"),
        ] {
            let err = parse(src).unwrap_err();
            assert!(err.contains(msg), "{src}: {err}");
        }
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        assert!(parse(&deep).unwrap_err().contains("deeper"));
    }
}
