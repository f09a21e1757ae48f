//! Resolving names against the compiled model and lowering expressions to SQL.
//!
//! A path names a field of the metric's entity (`amount`), a system column (`owner`,
//! `created_at`), a stage pseudo-field (`stage.probability`, `stage.kind`), a field of an entity
//! one many-to-one relation away (`account.industry`), or a property of the owning user
//! (`owner.manager`, `owner.name`). Only many-to-one joins exist, so no join can multiply rows.

use crate::dialect::Dialect;
use crate::expr::{BinOp, Expr, UnOp};
use trellis_form::db::{quote, Sql, Value};
use trellis_form::def::{FieldType, StageKind};
use trellis_form::model::{stage_entered_column, App, ColKind, Entity, Field};

/// The type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// A number.
    Num,
    /// Text.
    Text,
    /// True or false.
    Bool,
    /// A calendar date.
    Date,
    /// An instant.
    DateTime,
    /// A record or user id.
    Uuid,
    /// A list or JSON document (only `is null` works on it).
    Json,
    /// The literal `null`.
    Null,
}

impl Ty {
    fn of(kind: ColKind) -> Ty {
        match kind {
            ColKind::Bool => Ty::Bool,
            ColKind::Int | ColKind::Decimal => Ty::Num,
            ColKind::Text => Ty::Text,
            ColKind::Uuid => Ty::Uuid,
            ColKind::Date => Ty::Date,
            ColKind::DateTime => Ty::DateTime,
            ColKind::Json => Ty::Json,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Text => "text",
            Ty::Bool => "true/false",
            Ty::Date => "a date",
            Ty::DateTime => "a date and time",
            Ty::Uuid => "a record id",
            Ty::Json => "a list",
            Ty::Null => "null",
        }
    }
}

/// A lowered expression.
#[derive(Debug, Clone)]
pub struct Typed {
    /// SQL text (placeholders refer to the `Sql` it was lowered into).
    pub sql: String,
    /// Its type.
    pub ty: Ty,
    /// The column kind its values decode as.
    pub kind: ColKind,
    /// For select and stage fields: the label and the allowed values.
    pub options: Option<(String, Vec<String>)>,
    /// Whether this is a plain column of the base table (time anchors must be).
    pub base_column: bool,
}

impl Typed {
    fn new(sql: String, ty: Ty, kind: ColKind) -> Typed {
        Typed {
            sql,
            ty,
            kind,
            options: None,
            base_column: false,
        }
    }
}

/// A many-to-one join the query needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Join {
    /// A relation field to another entity's table.
    Relation {
        /// The relation field of the base entity.
        field: String,
        /// The target table.
        table: String,
    },
    /// The `users` row of a user column (`owner`, `created_by`, or a user field).
    User {
        /// The user column of the base entity.
        column: String,
    },
}

impl Join {
    /// The join's table alias.
    pub fn alias(&self) -> String {
        match self {
            Join::Relation { field, .. } => format!("j_{field}"),
            Join::User { column } => format!("u_{column}"),
        }
    }
}

/// Lowering context: one entity of one app, in one dialect, collecting the joins it needs.
pub struct Ctx<'a> {
    /// The app.
    pub app: &'a App,
    /// The base entity (table alias `t`).
    pub e: &'a Entity,
    /// The dialect.
    pub d: &'static dyn Dialect,
    /// Joins needed so far.
    pub joins: Vec<Join>,
}

impl<'a> Ctx<'a> {
    /// A context over `e`.
    pub fn new(app: &'a App, e: &'a Entity, d: &'static dyn Dialect) -> Self {
        Ctx {
            app,
            e,
            d,
            joins: vec![],
        }
    }

    /// `"table" t LEFT JOIN … ` for the base table and every join used.
    pub fn from_clause(&self) -> String {
        let mut s = format!("{} t", quote(&self.e.table));
        for j in &self.joins {
            let a = quote(&j.alias());
            match j {
                Join::Relation { field, table } => s.push_str(&format!(
                    " LEFT JOIN {} {a} ON {a}.\"id\" = t.{}",
                    quote(table),
                    quote(field)
                )),
                Join::User { column } => s.push_str(&format!(
                    " LEFT JOIN \"users\" {a} ON {a}.\"id\" = t.{}",
                    quote(column)
                )),
            }
        }
        s
    }

    fn join(&mut self, j: Join) -> String {
        let a = quote(&j.alias());
        if !self.joins.contains(&j) {
            self.joins.push(j);
        }
        a
    }

    /// Resolve a dotted path.
    pub fn path(&mut self, p: &[String]) -> Result<Typed, String> {
        let e = self.e;
        let name = p[0].as_str();
        let sys = match name {
            "id" | "created_by" | "owner" => Some(ColKind::Uuid),
            "created_at" | "updated_at" => Some(ColKind::DateTime),
            "version" => Some(ColKind::Int),
            _ => None,
        };
        if p.len() == 1 {
            if let Some(kind) = sys {
                let mut t = Typed::new(format!("t.{}", quote(name)), Ty::of(kind), kind);
                t.base_column = true;
                return Ok(t);
            }
            // Stage times (`stage__changed_at`, `stage__entered_won`) are columns too.
            if e.field(name).is_none() {
                if let Some(c) = e.columns().into_iter().find(|c| c.name == name) {
                    let mut t = Typed::new(format!("t.{}", quote(&c.name)), Ty::of(c.kind), c.kind);
                    t.base_column = true;
                    return Ok(t);
                }
            }
            let f = e.field(name).ok_or_else(|| unknown(e, name))?;
            let mut t = Typed::new(
                format!("t.{}", quote(&f.key)),
                Ty::of(f.col_kind()),
                f.col_kind(),
            );
            t.options = options(f);
            t.base_column = true;
            return Ok(t);
        }
        if p.len() > 2 {
            return Err(format!(
                "`{}` goes more than one relation deep; reports join one many-to-one step only",
                p.join(".")
            ));
        }
        let sub = p[1].as_str();
        let user_col = match (sys, e.field(name)) {
            (Some(ColKind::Uuid), _) if name != "id" => Some(name.to_owned()),
            (_, Some(f)) if f.ty == FieldType::User => Some(f.key.clone()),
            _ => None,
        };
        if let Some(column) = user_col {
            let a = self.join(Join::User { column });
            let (col, kind) = match sub {
                "name" => ("name", ColKind::Text),
                "email" => ("email", ColKind::Text),
                "manager" => ("manager_id", ColKind::Uuid),
                _ => {
                    return Err(format!(
                        "`{name}.{sub}` is not known; a user has name, email and manager"
                    ))
                }
            };
            return Ok(Typed::new(
                format!("{a}.{}", quote(col)),
                Ty::of(kind),
                kind,
            ));
        }
        let f = e.field(name).ok_or_else(|| unknown(e, name))?;
        match f.ty {
            FieldType::Stage => {
                let col = format!("t.{}", quote(&f.key));
                match sub {
                    "probability" => {
                        let mut case = format!("CASE {col}");
                        for s in &f.stages {
                            case.push_str(&format!(
                                " WHEN '{}' THEN {}",
                                s.key,
                                fmt_num(s.probability)
                            ));
                        }
                        case.push_str(" END");
                        Ok(Typed::new(case, Ty::Num, ColKind::Decimal))
                    }
                    "kind" => {
                        let mut case = format!("CASE {col}");
                        for s in &f.stages {
                            case.push_str(&format!(
                                " WHEN '{}' THEN '{}'",
                                s.key,
                                kind_name(s.kind)
                            ));
                        }
                        case.push_str(" END");
                        let mut t = Typed::new(case, Ty::Text, ColKind::Text);
                        t.options = Some((
                            format!("the kind of {}", f.label),
                            vec!["open".into(), "won".into(), "lost".into()],
                        ));
                        Ok(t)
                    }
                    _ => Err(format!(
                        "`{name}.{sub}` is not known; a stage has probability and kind"
                    )),
                }
            }
            FieldType::Relation => {
                let target_key = f.def.entity.clone().unwrap_or_default();
                let target = self
                    .app
                    .entity(&target_key)
                    .map_err(|_| format!("`{name}` points to a missing entity"))?;
                let (col, kind, opts) = match sub {
                    "id" | "owner" | "created_by" => (sub.to_owned(), ColKind::Uuid, None),
                    "created_at" | "updated_at" => (sub.to_owned(), ColKind::DateTime, None),
                    _ => {
                        let tf = target.field(sub).ok_or_else(|| unknown(target, sub))?;
                        (tf.key.clone(), tf.col_kind(), options(tf))
                    }
                };
                let a = self.join(Join::Relation {
                    field: f.key.clone(),
                    table: target.table.clone(),
                });
                let mut t = Typed::new(format!("{a}.{}", quote(&col)), Ty::of(kind), kind);
                t.options = opts;
                Ok(t)
            }
            _ => Err(format!(
                "`{name}` is not a relation, user or stage field, so `{name}.{sub}` means nothing"
            )),
        }
    }

    /// Lower `x` into SQL that binds its literals into `sql`.
    pub fn lower(&mut self, x: &Expr, sql: &mut Sql) -> Result<Typed, String> {
        Ok(match x {
            Expr::Num(n) => Typed::new(sql.param(Value::Decimal(*n)), Ty::Num, ColKind::Decimal),
            Expr::Str(s) => Typed::new(sql.param(Value::Text(s.clone())), Ty::Text, ColKind::Text),
            Expr::Bool(b) => Typed::new(self.d.bool_lit(*b).into(), Ty::Bool, ColKind::Bool),
            Expr::Null => Typed::new("NULL".into(), Ty::Null, ColKind::Text),
            Expr::Path(p) => self.path(p)?,
            Expr::Call(f, args) => self.call(f, args, sql)?,
            Expr::Unary(UnOp::Neg, a) => {
                let a = self.lower(a, sql)?;
                want(&a, Ty::Num, "`-`")?;
                Typed::new(format!("(-{})", a.sql), Ty::Num, ColKind::Decimal)
            }
            Expr::Unary(UnOp::Not, a) => {
                let a = self.lower(a, sql)?;
                want(&a, Ty::Bool, "`not`")?;
                Typed::new(format!("(NOT {})", a.sql), Ty::Bool, ColKind::Bool)
            }
            Expr::IsNull(a, not) => {
                let a = self.lower(a, sql)?;
                let op = if *not { "IS NOT NULL" } else { "IS NULL" };
                Typed::new(format!("({} {op})", a.sql), Ty::Bool, ColKind::Bool)
            }
            Expr::In(a, items) if self.stage_kind(a).is_some() => {
                self.kind_test(a, items, false, sql)?
            }
            Expr::Binary(op @ (BinOp::Eq | BinOp::Ne), a, b)
                if self.stage_kind(a).is_some() && matches!(**b, Expr::Str(_)) =>
            {
                self.kind_test(a, std::slice::from_ref(b), *op == BinOp::Ne, sql)?
            }
            Expr::In(a, items) => {
                let a = self.lower(a, sql)?;
                let mut ps = vec![];
                for i in items {
                    if !matches!(i, Expr::Num(_) | Expr::Str(_)) {
                        return Err("lists after `in` hold only numbers and 'text'".into());
                    }
                    check_option(&a, i)?;
                    let b = self.lower(i, sql)?;
                    comparable(&a, &b)?;
                    ps.push(b.sql);
                }
                Typed::new(
                    format!("({} IN ({}))", a.sql, ps.join(", ")),
                    Ty::Bool,
                    ColKind::Bool,
                )
            }
            Expr::Binary(op, a, b) => {
                let (ea, eb) = (a, b);
                let a = self.lower(ea, sql)?;
                let b = self.lower(eb, sql)?;
                match op {
                    BinOp::And | BinOp::Or => {
                        want(&a, Ty::Bool, op.sql())?;
                        want(&b, Ty::Bool, op.sql())?;
                        Typed::new(
                            format!("({} {} {})", a.sql, op.sql(), b.sql),
                            Ty::Bool,
                            ColKind::Bool,
                        )
                    }
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => {
                        want(&a, Ty::Num, op.sql())?;
                        want(&b, Ty::Num, op.sql())?;
                        let s = if *op == BinOp::Div {
                            format!("({} / NULLIF({}, 0))", self.d.real(&a.sql), b.sql)
                        } else {
                            format!("({} {} {})", a.sql, op.sql(), b.sql)
                        };
                        Typed::new(s, Ty::Num, ColKind::Decimal)
                    }
                    _ => {
                        if a.ty == Ty::Null || b.ty == Ty::Null {
                            return Err(
                                "compares with null; write `x is null` or `x is not null`".into()
                            );
                        }
                        check_option(&a, eb)?;
                        check_option(&b, ea)?;
                        comparable(&a, &b)?;
                        Typed::new(
                            format!("({} {} {})", a.sql, op.sql(), b.sql),
                            Ty::Bool,
                            ColKind::Bool,
                        )
                    }
                }
            }
        })
    }

    /// The stage field of a `stage.kind` path.
    fn stage_kind(&self, x: &Expr) -> Option<&'a Field> {
        match x {
            Expr::Path(p) if p.len() == 2 && p[1] == "kind" => {
                self.e.field(&p[0]).filter(|f| f.ty == FieldType::Stage)
            }
            _ => None,
        }
    }

    /// `stage.kind == 'won'` (or `in [...]`, `!=`) as a test on the stage column itself
    /// (`stage IN ('won')`), which an index can serve, instead of on a CASE over it.
    fn kind_test(
        &mut self,
        path: &Expr,
        kinds: &[Expr],
        negate: bool,
        sql: &mut Sql,
    ) -> Result<Typed, String> {
        let f = self.stage_kind(path).expect("checked by the caller");
        let kind_path = self.lower(path, &mut Sql::default())?;
        let mut wanted = vec![];
        for k in kinds {
            check_option(&kind_path, k)?;
            match k {
                Expr::Str(s) => wanted.push(s.as_str()),
                _ => return Err("lists after `in` hold only numbers and 'text'".into()),
            }
        }
        let keys: Vec<String> = f
            .stages
            .iter()
            .filter(|s| wanted.contains(&kind_name(s.kind)))
            .map(|s| sql.param(Value::Text(s.key.clone())))
            .collect();
        let col = format!("t.{}", quote(&f.key));
        let test = match (keys.is_empty(), negate) {
            (true, false) => format!("({col} IS NOT NULL AND 1 = 0)"),
            (true, true) => format!("({col} IS NOT NULL)"),
            (false, false) => format!("({col} IN ({}))", keys.join(", ")),
            (false, true) => format!("({col} NOT IN ({}))", keys.join(", ")),
        };
        Ok(Typed::new(test, Ty::Bool, ColKind::Bool))
    }

    fn call(&mut self, f: &str, args: &[Expr], sql: &mut Sql) -> Result<Typed, String> {
        let arity = |n: usize| -> Result<(), String> {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!("`{f}` takes {n} argument(s), not {}", args.len()))
            }
        };
        match f {
            "entered_at" => {
                arity(1)?;
                let Expr::Str(stage) = &args[0] else {
                    return Err(
                        "`entered_at` takes a stage key in quotes: entered_at('won')".into(),
                    );
                };
                let sf = self.e.stage().ok_or_else(|| {
                    format!(
                        "`entered_at` needs a stage field, and {} has none",
                        self.e.label
                    )
                })?;
                if sf.stage(stage).is_none() {
                    return Err(format!(
                        "'{stage}' is not a stage of {}; use one of: {}",
                        sf.label,
                        sf.stages
                            .iter()
                            .map(|s| s.key.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                let mut t = Typed::new(
                    format!("t.{}", quote(&stage_entered_column(&sf.key, stage))),
                    Ty::DateTime,
                    ColKind::DateTime,
                );
                t.base_column = true;
                Ok(t)
            }
            "days_between" => {
                arity(2)?;
                let a = self.lower(&args[0], sql)?;
                let b = self.lower(&args[1], sql)?;
                for x in [&a, &b] {
                    if !matches!(x.ty, Ty::Date | Ty::DateTime) {
                        return Err(format!("`days_between` takes dates, not {}", x.ty.name()));
                    }
                }
                Ok(Typed::new(
                    self.d.days_between(&a.sql, &b.sql),
                    Ty::Num,
                    ColKind::Decimal,
                ))
            }
            "abs" => {
                arity(1)?;
                let a = self.lower(&args[0], sql)?;
                want(&a, Ty::Num, "`abs`")?;
                Ok(Typed::new(
                    format!("ABS({})", a.sql),
                    Ty::Num,
                    ColKind::Decimal,
                ))
            }
            "round" => {
                if args.is_empty() || args.len() > 2 {
                    return Err("`round` takes a number and optionally the digits to keep".into());
                }
                let a = self.lower(&args[0], sql)?;
                want(&a, Ty::Num, "`round`")?;
                let digits = match args.get(1) {
                    None => 0,
                    Some(Expr::Num(n)) if n.is_integer() && *n >= 0.into() && *n <= 10.into() => {
                        n.to_string().parse::<u32>().unwrap_or(0)
                    }
                    Some(_) => return Err("`round` keeps 0 to 10 digits, given as a number".into()),
                };
                Ok(Typed::new(
                    format!("ROUND({}, {digits})", self.d.real(&a.sql)),
                    Ty::Num,
                    ColKind::Decimal,
                ))
            }
            "coalesce" => {
                if args.len() < 2 {
                    return Err("`coalesce` takes at least two values".into());
                }
                let mut parts: Vec<Typed> = vec![];
                for a in args {
                    let t = self.lower(a, sql)?;
                    if let Some(first) = parts.first() {
                        comparable(first, &t)?;
                    }
                    parts.push(t);
                }
                let first = parts[0].clone();
                let text = parts
                    .iter()
                    .map(|p| p.sql.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                Ok(Typed::new(
                    format!("COALESCE({text})"),
                    first.ty,
                    first.kind,
                ))
            }
            _ => Err(format!("`{f}` is not a function")),
        }
    }
}

fn kind_name(k: StageKind) -> &'static str {
    match k {
        StageKind::Open => "open",
        StageKind::Won => "won",
        StageKind::Lost => "lost",
    }
}

fn fmt_num(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

fn options(f: &Field) -> Option<(String, Vec<String>)> {
    match f.ty {
        FieldType::Select => Some((f.label.clone(), f.options.clone())),
        FieldType::Stage => Some((
            f.label.clone(),
            f.stages.iter().map(|s| s.key.clone()).collect(),
        )),
        _ => None,
    }
}

fn unknown(e: &Entity, name: &str) -> String {
    format!("`{name}` is not a field of {}", e.label)
}

fn want(t: &Typed, ty: Ty, what: &str) -> Result<(), String> {
    if t.ty == ty || t.ty == Ty::Null {
        Ok(())
    } else {
        Err(format!("{what} needs {}, not {}", ty.name(), t.ty.name()))
    }
}

fn comparable(a: &Typed, b: &Typed) -> Result<(), String> {
    let ok = a.ty == b.ty
        || a.ty == Ty::Null
        || b.ty == Ty::Null
        || matches!(
            (a.ty, b.ty),
            (Ty::Date | Ty::DateTime, Ty::Date | Ty::DateTime)
        );
    if ok {
        Ok(())
    } else {
        Err(format!("compares {} with {}", a.ty.name(), b.ty.name()))
    }
}

/// A text literal compared with a select or stage field must be one of its values.
fn check_option(field: &Typed, other: &Expr) -> Result<(), String> {
    if let (Some((label, allowed)), Expr::Str(s)) = (&field.options, other) {
        if !allowed.iter().any(|a| a == s) {
            return Err(format!(
                "'{s}' is not a value of {label}; use one of: {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}
