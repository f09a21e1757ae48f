//! Schema evolution: the difference between two compiled apps as a migration plan.
//!
//! A plan is a list of [`Step`]s a person can read (and a program can parse) before anything is
//! applied. Each step says whether it destroys data. Destructive steps (dropping a field or an
//! entity, changing a type, removing an option or a stage) are refused unless the caller
//! explicitly allows them. Tightening steps (a field becomes required or unique) are checked
//! against the existing rows and refused, with a count, when the data does not fit.

use crate::db::{quote, Backend, Sql};
use crate::def::FieldType;
use crate::model::{App, ColKind, Entity, Field, SYSTEM_COLUMNS};
use serde::Serialize;

/// What one step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A new entity: its table and indexes.
    CreateEntity,
    /// A new field: its column(s), backfilled with the default if it has one.
    AddField,
    /// A new stage in a pipeline: its entry-time column.
    AddStage,
    /// A new (non-unique) index.
    AddIndex,
    /// A new unique index; fails if existing rows share a value.
    AddUnique,
    /// An index removed (the data stays).
    DropIndex,
    /// A constraint relaxed or metadata changed (labels, options added, bounds widened …).
    UpdateField,
    /// A constraint tightened; existing rows are checked where the engine can.
    TightenField,
    /// A field removed: its column and data are dropped.
    DropField,
    /// A field's type changed: its column is dropped and re-created empty.
    ChangeType,
    /// Options removed from a select or multiselect.
    RemoveOption,
    /// A stage removed from a pipeline: its entry-time column is dropped.
    RemoveStage,
    /// An entity removed: its table and all its records are dropped.
    DropEntity,
    /// Entity-level metadata changed (label, history policy).
    UpdateEntity,
    /// A summary field new or changed: computed again for every record from the related ones.
    FillSummary,
}

/// One step of a migration plan.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What the step does.
    pub kind: StepKind,
    /// The entity it touches.
    pub entity: String,
    /// The field, where it touches one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// JSON pointer of what the step is about in the new definition (`/entities/3/fields/2`),
    /// or `/entities` for an entity that is gone.
    pub path: String,
    /// Whether applying it loses data.
    pub destructive: bool,
    /// A sentence describing it.
    pub description: String,
    /// The SQL it runs, in order (values are bound parameters, shown as `$n`).
    pub sql: Vec<Sql>,
    /// Checks run before the SQL: (count query, message if the count is not zero).
    #[serde(skip)]
    pub checks: Vec<(Sql, String)>,
}

/// A migration plan from one app version to the next.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Plan {
    /// Steps, in the order they are applied.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Whether any step destroys data.
    pub fn is_destructive(&self) -> bool {
        self.steps.iter().any(|s| s.destructive)
    }

    /// A readable, one-line-per-step rendering.
    pub fn render(&self) -> String {
        if self.steps.is_empty() {
            return "No changes.\n".to_owned();
        }
        let mut out = String::new();
        for s in &self.steps {
            let mark = if s.destructive { "!" } else { "+" };
            out.push_str(&format!(
                "{mark} {:<14} {}\n",
                kind_name(s.kind),
                s.description
            ));
        }
        out
    }
}

fn kind_name(k: StepKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Name of the index of `column` on `table`, short enough for PostgreSQL's 63-byte limit.
pub fn index_name(table: &str, column: &str, unique: bool) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in table.bytes().chain([b'.']).chain(column.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{}_{h:016x}", if unique { "uq" } else { "ix" })
}

/// The unique field a unique index belongs to, if any.
pub fn unique_field_of_index<'a>(entity: &'a Entity, index: &str) -> Option<&'a Field> {
    entity
        .fields
        .iter()
        .find(|f| f.def.unique && index_name(&entity.table, &f.key, true) == index)
}

/// The statements creating an entity's table and indexes.
pub fn create_entity_sql(backend: Backend, e: &Entity) -> Vec<Sql> {
    let t = quote(&e.table);
    let mut cols = vec![
        format!("\"id\" {} PRIMARY KEY", backend.column_type(ColKind::Uuid)),
        format!(
            "\"created_at\" {} NOT NULL",
            backend.column_type(ColKind::DateTime)
        ),
        format!(
            "\"updated_at\" {} NOT NULL",
            backend.column_type(ColKind::DateTime)
        ),
        format!("\"created_by\" {}", backend.column_type(ColKind::Uuid)),
        format!("\"owner\" {}", backend.column_type(ColKind::Uuid)),
        format!("\"version\" {} NOT NULL", backend.column_type(ColKind::Int)),
    ];
    for c in e.columns() {
        cols.push(format!(
            "{} {}",
            quote(&c.name),
            backend.column_type(c.kind)
        ));
    }
    let mut sql = vec![Sql::new(format!(
        "CREATE TABLE {t} (\n  {}\n)",
        cols.join(",\n  ")
    ))];
    for sys in ["owner", "created_at"] {
        sql.push(Sql::new(format!(
            "CREATE INDEX {} ON {t} ({})",
            index_name(&e.table, sys, false),
            quote(sys)
        )));
    }
    for f in &e.fields {
        sql.extend(index_sql(e, f));
    }
    for cols in &e.indexes {
        sql.push(compound_index_sql(e, cols));
    }
    sql
}

/// `CREATE INDEX` for an index over several columns.
fn compound_index_sql(e: &Entity, cols: &[String]) -> Sql {
    Sql::new(format!(
        "CREATE INDEX {} ON {} ({})",
        index_name(&e.table, &cols.join(","), false),
        quote(&e.table),
        cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ")
    ))
}

/// Whether a field that changes from `of` to `f` has its columns dropped and re-created (a
/// `change_type` step): a new type or relation target, unless the values are kept (text to
/// long text and the like).
fn rebuilds_columns(of: &Field, f: &Field) -> bool {
    let same_kind =
        of.col_kind() == f.col_kind() && of.ty != FieldType::Money && f.ty != FieldType::Money;
    let widening = same_kind
        && matches!(f.ty, FieldType::Text | FieldType::LongText)
        && f.col_kind() == ColKind::Text
        && of.ty != FieldType::Stage;
    (of.ty != f.ty || of.def.entity != f.def.entity) && !widening
}

/// Whether an index over several columns stays as it is from `oe` to `e`: both define it, and
/// no field owning one of its columns has its columns re-created (else the index goes first,
/// before the column is dropped, and comes back after). A column that is gone from `e` cannot
/// be in its indexes: the definition check refuses it.
fn compound_index_kept(oe: &Entity, e: &Entity, cols: &[String]) -> bool {
    let owner = |x: &'_ Entity, c: &str| -> Option<usize> {
        x.fields
            .iter()
            .position(|f| f.columns().iter().any(|col| col.name == c))
    };
    oe.indexes.iter().any(|x| x == cols)
        && e.indexes.iter().any(|x| x == cols)
        && cols.iter().all(|c| {
            SYSTEM_COLUMNS.contains(&c.as_str())
                || match (owner(oe, c), owner(e, c)) {
                    (Some(i), Some(j)) => !rebuilds_columns(&oe.fields[i], &e.fields[j]),
                    _ => false,
                }
        })
}

fn index_sql(e: &Entity, f: &Field) -> Vec<Sql> {
    let t = quote(&e.table);
    if f.def.unique {
        vec![Sql::new(format!(
            "CREATE UNIQUE INDEX {} ON {t} ({})",
            index_name(&e.table, &f.key, true),
            quote(&f.key)
        ))]
    } else if f.wants_index() {
        vec![Sql::new(format!(
            "CREATE INDEX {} ON {t} ({})",
            index_name(&e.table, &f.key, false),
            quote(&f.key)
        ))]
    } else {
        vec![]
    }
}

fn drop_index_sql(e: &Entity, f: &Field) -> Vec<Sql> {
    if f.def.unique {
        vec![Sql::new(format!(
            "DROP INDEX {}",
            index_name(&e.table, &f.key, true)
        ))]
    } else if f.wants_index() {
        vec![Sql::new(format!(
            "DROP INDEX {}",
            index_name(&e.table, &f.key, false)
        ))]
    } else {
        vec![]
    }
}

fn add_columns_sql(backend: Backend, e: &Entity, f: &Field) -> Vec<Sql> {
    f.columns()
        .iter()
        .map(|c| {
            Sql::new(format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(&e.table),
                quote(&c.name),
                backend.column_type(c.kind)
            ))
        })
        .collect()
}

fn drop_columns_sql(e: &Entity, f: &Field) -> Vec<Sql> {
    let mut sql = drop_index_sql(e, f);
    sql.extend(f.columns().iter().map(|c| {
        Sql::new(format!(
            "ALTER TABLE {} DROP COLUMN {}",
            quote(&e.table),
            quote(&c.name)
        ))
    }));
    sql
}

/// The plan from `old` (None: nothing installed yet) to `new`.
pub fn plan(backend: Backend, old: Option<&App>, new: &App) -> Plan {
    let mut steps = vec![];
    for e in &new.entities {
        match old.and_then(|o| o.entity(&e.key).ok()) {
            None => steps.push(Step {
                kind: StepKind::CreateEntity,
                entity: e.key.clone(),
                field: None,
                path: String::new(),
                destructive: false,
                description: format!("create entity `{}` ({} fields)", e.key, e.fields.len()),
                sql: create_entity_sql(backend, e),
                checks: vec![],
            }),
            Some(oe) => diff_entity(backend, oe, e, &mut steps),
        }
    }
    if let Some(old) = old {
        for oe in &old.entities {
            if new.entity(&oe.key).is_err() {
                steps.push(Step {
                    kind: StepKind::DropEntity,
                    entity: oe.key.clone(),
                    field: None,
                    path: String::new(),
                    destructive: true,
                    description: format!("drop entity `{}` and ALL its records", oe.key),
                    sql: vec![Sql::new(format!("DROP TABLE {}", quote(&oe.table)))],
                    checks: vec![],
                });
            }
        }
    }
    // Summaries last, once the tables they read and write have their columns.
    if let Some(old) = old {
        for src in crate::summary::all(new) {
            let Ok(oe) = old.entity(&src.target.key) else {
                continue; // a new entity: no records yet
            };
            let before = oe.field(&src.field.key);
            let same = before
                .is_some_and(|of| of.ty == src.field.ty && of.def.summary == src.field.def.summary);
            let via_kept = old
                .entity(&src.source.key)
                .ok()
                .and_then(|os| os.field(src.via))
                .zip(src.source.field(src.via))
                .is_some_and(|(ov, v)| !rebuilds_columns(ov, v));
            if same && via_kept {
                continue;
            }
            steps.push(Step {
                kind: StepKind::FillSummary,
                entity: src.target.key.clone(),
                field: Some(src.field.key.clone()),
                path: String::new(),
                destructive: false,
                description: format!(
                    "compute `{}.{}` from `{}` for every record",
                    src.target.key, src.field.key, src.source.key
                ),
                // A new column is empty: one grouped pass fills it.
                sql: vec![match before {
                    None => crate::summary::fill_empty_sql(&src),
                    Some(_) => crate::summary::fill_sql(&src),
                }],
                checks: vec![],
            });
        }
    }
    for s in &mut steps {
        s.path = match new.entities.iter().position(|e| e.key == s.entity) {
            Some(i) => match s
                .field
                .as_ref()
                .and_then(|f| new.entities[i].fields.iter().position(|x| &x.key == f))
            {
                Some(j) => format!("/entities/{i}/fields/{j}"),
                None => format!("/entities/{i}"),
            },
            None => "/entities".to_owned(),
        };
    }
    Plan { steps }
}

fn diff_entity(backend: Backend, oe: &Entity, e: &Entity, steps: &mut Vec<Step>) {
    let step = |kind, field: &str, destructive, description: String, sql: Vec<Sql>| Step {
        kind,
        entity: e.key.clone(),
        field: Some(field.to_owned()).filter(|f| !f.is_empty()),
        path: String::new(),
        destructive,
        description,
        sql,
        checks: vec![],
    };
    let t = quote(&e.table);
    // Indexes over several columns that go or change go first, before a column they cover
    // can be dropped (SQLite refuses to drop an indexed column).
    for cols in &oe.indexes {
        if !compound_index_kept(oe, e, cols) {
            steps.push(step(
                StepKind::DropIndex,
                "",
                false,
                format!("drop the index of `{}` on ({})", e.key, cols.join(", ")),
                vec![Sql::new(format!(
                    "DROP INDEX {}",
                    index_name(&oe.table, &cols.join(","), false)
                ))],
            ));
        }
    }
    if oe.meta != e.meta {
        steps.push(step(
            StepKind::UpdateEntity,
            "",
            false,
            format!("update `{}` (label or history policy)", e.key),
            vec![],
        ));
    }
    for f in &e.fields {
        let Some(of) = oe.field(&f.key) else {
            let mut sql = add_columns_sql(backend, e, f);
            let mut checks = vec![];
            if let Some(d) = &f.def.default {
                sql.push(backfill(e, f, d, false));
            } else if f.def.required {
                checks.push((
                    Sql::new(format!("SELECT COUNT(*) FROM {t}")),
                    format!("`{}.{}` is new and required but has no default, and existing records would have no value; give it a default", e.key, f.key),
                ));
            }
            sql.extend(index_sql(e, f));
            let mut s = step(
                StepKind::AddField,
                &f.key,
                false,
                format!("add field `{}.{}` ({})", e.key, f.key, f.ty.name()),
                sql,
            );
            s.checks = checks;
            steps.push(s);
            continue;
        };
        if of.ty != f.ty || of.def.entity != f.def.entity {
            if !rebuilds_columns(of, f) {
                steps.push(step(
                    StepKind::UpdateField,
                    &f.key,
                    false,
                    format!(
                        "change `{}.{}` from {} to {} (values kept)",
                        e.key,
                        f.key,
                        of.ty.name(),
                        f.ty.name()
                    ),
                    vec![],
                ));
            } else {
                let mut sql = drop_columns_sql(oe, of);
                sql.extend(add_columns_sql(backend, e, f));
                sql.extend(index_sql(e, f));
                steps.push(step(
                    StepKind::ChangeType,
                    &f.key,
                    true,
                    format!(
                        "change `{}.{}` from {} to {}: its current values are DROPPED",
                        e.key,
                        f.key,
                        of.ty.name(),
                        f.ty.name()
                    ),
                    sql,
                ));
                continue;
            }
        }
        // Indexes.
        if of.def.unique != f.def.unique || of.wants_index() != f.wants_index() {
            let mut sql = drop_index_sql(oe, of);
            sql.extend(index_sql(e, f));
            let (kind, what) = if f.def.unique && !of.def.unique {
                (
                    StepKind::AddUnique,
                    "make `{}` unique (fails if existing records share a value)",
                )
            } else if !f.def.unique && !f.wants_index() {
                (StepKind::DropIndex, "drop the index of `{}`")
            } else {
                (StepKind::AddIndex, "index `{}`")
            };
            steps.push(step(
                kind,
                &f.key,
                false,
                what.replace("{}", &format!("{}.{}", e.key, f.key)),
                sql,
            ));
        }
        // Options and stages.
        // Options only matter while the field stays a select (a new type drops them anyway).
        let removed: Vec<&String> = of
            .options
            .iter()
            .filter(|o| of.ty == f.ty && !f.options.contains(o))
            .collect();
        if !removed.is_empty() {
            steps.push(step(
                StepKind::RemoveOption,
                &f.key,
                true,
                format!("remove option(s) {} from `{}.{}`: records holding them keep a value that is no longer valid", list(&removed), e.key, f.key),
                vec![],
            ));
        }
        for s in &f.stages {
            if of.stage(&s.key).is_none() {
                let c = crate::model::stage_entered_column(&f.key, &s.key);
                let days = crate::model::stage_days_column(&f.key, &s.key);
                steps.push(step(
                    StepKind::AddStage,
                    &f.key,
                    false,
                    format!("add stage `{}` to `{}.{}`", s.key, e.key, f.key),
                    vec![
                        Sql::new(format!(
                            "ALTER TABLE {t} ADD COLUMN {} {}",
                            quote(&c),
                            backend.column_type(ColKind::DateTime)
                        )),
                        Sql::new(format!(
                            "ALTER TABLE {t} ADD COLUMN {} {}",
                            quote(&days),
                            backend.column_type(ColKind::Decimal)
                        )),
                    ],
                ));
            }
        }
        for s in &of.stages {
            if f.stage(&s.key).is_none() {
                let c = crate::model::stage_entered_column(&f.key, &s.key);
                let mut st = step(
                    StepKind::RemoveStage,
                    &f.key,
                    true,
                    format!(
                        "remove stage `{}` from `{}.{}`: its entry times are DROPPED",
                        s.key, e.key, f.key
                    ),
                    vec![
                        Sql::new(format!("ALTER TABLE {t} DROP COLUMN {}", quote(&c))),
                        Sql::new(format!(
                            "ALTER TABLE {t} DROP COLUMN {}",
                            quote(&crate::model::stage_days_column(&f.key, &s.key))
                        )),
                    ],
                );
                st.checks.push((
                    {
                        let mut q = Sql::new(format!(
                            "SELECT COUNT(*) FROM {t} WHERE {} = ",
                            quote(&f.key)
                        ));
                        q.bind(crate::db::Value::Text(s.key.clone()));
                        q
                    },
                    format!(
                        "records of `{}` are still in stage `{}`; move them first",
                        e.key, s.key
                    ),
                ));
                steps.push(st);
            }
        }
        // Required.
        if f.def.required && !of.def.required {
            let mut sql = vec![];
            let mut checks = vec![];
            if let Some(d) = &f.def.default {
                sql.push(backfill(e, f, d, true));
            } else {
                checks.push((
                    Sql::new(format!("SELECT COUNT(*) FROM {t} WHERE {} IS NULL", quote(&f.key))),
                    format!("`{}.{}` becomes required but existing records have no value; fill them or give the field a default", e.key, f.key),
                ));
            }
            let mut s = step(
                StepKind::TightenField,
                &f.key,
                false,
                format!("make `{}.{}` required", e.key, f.key),
                sql,
            );
            s.checks = checks;
            steps.push(s);
        }
        // Everything else is metadata or a constraint applied to new writes.
        let strip = |d: &crate::def::FieldDef| crate::def::FieldDef {
            unique: false,
            indexed: false,
            required: false,
            options: vec![],
            stages: vec![],
            ..d.clone()
        };
        let options_added = f.options.iter().any(|o| !of.options.contains(o));
        let common = |a: &Field, b: &Field| -> Vec<crate::def::StageDef> {
            a.def
                .stages
                .iter()
                .filter(|s| b.stage(&s.key).is_some())
                .cloned()
                .collect()
        };
        let stages_edited = common(f, of) != common(of, f);
        let type_changed = of.ty != f.ty;
        if !type_changed && strip(&of.def) != strip(&f.def)
            || options_added
            || stages_edited
            || (of.def.required && !f.def.required)
        {
            steps.push(step(
                StepKind::UpdateField,
                &f.key,
                false,
                format!("update `{}.{}` (labels, options, bounds or pipeline settings; existing records are not re-checked)", e.key, f.key),
                vec![],
            ));
        }
    }
    for of in &oe.fields {
        if e.field(&of.key).is_none() {
            steps.push(step(
                StepKind::DropField,
                &of.key,
                true,
                format!("drop field `{}.{}` and its values", e.key, of.key),
                drop_columns_sql(oe, of),
            ));
        }
    }
    // New indexes over several columns come last, once their columns exist.
    for cols in &e.indexes {
        if !compound_index_kept(oe, e, cols) {
            steps.push(step(
                StepKind::AddIndex,
                "",
                false,
                format!("index `{}` on ({})", e.key, cols.join(", ")),
                vec![compound_index_sql(e, cols)],
            ));
        }
    }
}

fn list(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `UPDATE table SET field = <default>` with the default bound as a parameter.
fn backfill(e: &Entity, f: &Field, d: &serde_json::Value, only_null: bool) -> Sql {
    let mut sql = Sql::new(format!("UPDATE {} SET ", quote(&e.table)));
    let cols = f.columns();
    let vals = crate::values::to_sql(f, d, "").unwrap_or_default();
    for (i, (c, v)) in cols.iter().zip(vals).enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.ident(&c.name).push(" = ").bind(v);
    }
    if only_null {
        sql.push(" WHERE ").ident(&f.key).push(" IS NULL");
    }
    sql
}

/// System columns plus field columns, to check a column list against.
pub fn all_columns(e: &Entity) -> Vec<String> {
    SYSTEM_COLUMNS
        .iter()
        .map(|s| s.to_string())
        .chain(e.columns().into_iter().map(|c| c.name))
        .collect()
}
