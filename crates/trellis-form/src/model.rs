//! The compiled app: what the engine runs after [`crate::compile`] has checked a definition.
//!
//! Everything here is derived from an [`AppDef`] once (regexes compiled, JSON Schemas built,
//! columns laid out), so the write path never re-parses or re-checks a definition.

use crate::def::{AppDef, FieldDef, FieldType, StageKind};
use crate::error::{FormError, Result};
use rust_decimal::Decimal;

/// Columns every entity table has, in this order. Field keys may not use these names.
pub const SYSTEM_COLUMNS: [&str; 6] = [
    "id",
    "created_at",
    "updated_at",
    "created_by",
    "owner",
    "version",
];

/// A compiled, checked app.
#[derive(Debug)]
pub struct App {
    /// App key.
    pub key: String,
    /// Version number of this definition (1 for the first import).
    pub version: i64,
    /// The definition it was compiled from.
    pub def: AppDef,
    /// Compiled entities, in definition order.
    pub entities: Vec<Entity>,
    /// Roles: the built-ins (as shipped or redefined) and the app's own.
    pub roles: crate::roles::Roles,
    /// Maintenance statements of the app's rollups, handed in by the report engine (see
    /// [`crate::rollup`]).
    pub rollups: std::sync::OnceLock<Vec<crate::rollup::Maintain>>,
}

impl App {
    /// The entity with `key`, or [`FormError::EntityNotFound`].
    pub fn entity(&self, key: &str) -> Result<&Entity> {
        self.entities
            .iter()
            .find(|e| e.key == key)
            .ok_or_else(|| FormError::EntityNotFound(key.to_owned()))
    }
}

/// A compiled entity.
#[derive(Debug)]
pub struct Entity {
    /// Entity key.
    pub key: String,
    /// English (or first) label, for messages.
    pub label: String,
    /// SQL table name: `{app}__{entity}`.
    pub table: String,
    /// Fields in definition order.
    pub fields: Vec<Field>,
    /// Index into `fields` of the stage field, if any.
    pub stage_field: Option<usize>,
    /// Fields whose changes are written to the history (the stage field is always among them).
    pub tracked: Vec<String>,
    /// Days to keep non-stage history rows.
    pub retention_days: Option<u32>,
    /// The app's time zone (formulas see `today` in it).
    pub timezone: chrono_tz::Tz,
    /// The entity's label and history policy as defined (to detect metadata changes).
    pub meta: (Option<crate::def::Label>, crate::def::HistoryDef),
    /// Indexes over several columns (column names, in order).
    pub indexes: Vec<Vec<String>>,
    pub(crate) validator: jsonschema::Validator,
}

impl Entity {
    /// The field with `key`.
    pub fn field(&self, key: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.key == key)
    }

    /// The stage field, if the entity has a pipeline.
    pub fn stage(&self) -> Option<&Field> {
        self.stage_field.map(|i| &self.fields[i])
    }

    /// Whether changes of `field` are written to the history.
    pub fn tracks(&self, field: &str) -> bool {
        self.tracked.iter().any(|t| t == field)
    }

    /// Every column of the table after the system columns, with its kind.
    pub fn columns(&self) -> Vec<Column> {
        self.fields.iter().flat_map(Field::columns).collect()
    }
}

/// A compiled field.
#[derive(Debug)]
pub struct Field {
    /// Field key (also the main column name).
    pub key: String,
    /// Field type.
    pub ty: FieldType,
    /// English (or first) label, for messages.
    pub label: String,
    /// The definition, verbatim.
    pub def: FieldDef,
    /// Option keys of a select/multiselect.
    pub options: Vec<String>,
    /// Stages of a stage field.
    pub stages: Vec<Stage>,
    /// Digits after the decimal point (decimal, money).
    pub scale: u32,
    /// Default currency (money).
    pub currency: String,
    /// Numeric bounds (integer, decimal, money).
    pub min_num: Option<Decimal>,
    /// Numeric bounds (integer, decimal, money).
    pub max_num: Option<Decimal>,
    /// Date bounds.
    pub min_date: Option<chrono::NaiveDate>,
    /// Date bounds.
    pub max_date: Option<chrono::NaiveDate>,
    pub(crate) json_validator: Option<jsonschema::Validator>,
    /// The compiled expression of a formula field.
    pub formula: Option<std::sync::Arc<crate::formula::Formula>>,
}

/// A compiled stage.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Stage key.
    pub key: String,
    /// English (or first) label.
    pub label: String,
    /// Win probability, 0–1.
    pub probability: f64,
    /// Open, won or lost.
    pub kind: StageKind,
    /// Fields required to enter.
    pub entry_criteria: Vec<String>,
}

/// The SQL-side kind of a column; each backend maps it to its own type (see [`crate::db`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColKind {
    /// Boolean.
    Bool,
    /// 64-bit integer.
    Int,
    /// Exact decimal (NUMERIC on PostgreSQL, REAL on SQLite with at most 15 significant digits).
    Decimal,
    /// Text.
    Text,
    /// UUID (native on PostgreSQL, text on SQLite).
    Uuid,
    /// Calendar date.
    Date,
    /// UTC instant.
    DateTime,
    /// JSON document.
    Json,
}

/// One column of an entity table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Its kind.
    pub kind: ColKind,
}

impl Column {
    pub(crate) fn new(name: impl Into<String>, kind: ColKind) -> Self {
        Column {
            name: name.into(),
            kind,
        }
    }
}

impl Field {
    /// Whether a value is required.
    pub fn required(&self) -> bool {
        self.def.required
    }

    /// The column kind of the field's main column.
    pub fn col_kind(&self) -> ColKind {
        match &self.formula {
            Some(f) => f.result.col_kind(),
            None => col_kind(self.ty),
        }
    }

    /// All columns of this field: the main one, a money field's currency, a stage field's times.
    pub fn columns(&self) -> Vec<Column> {
        let mut cols = vec![Column::new(&self.key, self.col_kind())];
        match self.ty {
            FieldType::Money => cols.push(Column::new(currency_column(&self.key), ColKind::Text)),
            FieldType::Stage => {
                cols.push(Column::new(
                    stage_changed_column(&self.key),
                    ColKind::DateTime,
                ));
                for s in &self.stages {
                    cols.push(Column::new(
                        stage_entered_column(&self.key, &s.key),
                        ColKind::DateTime,
                    ));
                }
                for s in &self.stages {
                    cols.push(Column::new(
                        stage_days_column(&self.key, &s.key),
                        ColKind::Decimal,
                    ));
                }
            }
            _ => {}
        }
        cols
    }

    /// The stage with `key`.
    pub fn stage(&self, key: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.key == key)
    }

    /// Whether the field gets a (non-unique) index.
    pub fn wants_index(&self) -> bool {
        !self.def.unique
            && (self.def.indexed
                || matches!(
                    self.ty,
                    FieldType::Relation | FieldType::User | FieldType::Stage
                ))
    }
}

/// The column kind of a field type.
pub fn col_kind(ty: FieldType) -> ColKind {
    match ty {
        FieldType::Text
        | FieldType::LongText
        | FieldType::Email
        | FieldType::Phone
        | FieldType::Url
        | FieldType::Select
        | FieldType::Stage => ColKind::Text,
        FieldType::Integer => ColKind::Int,
        FieldType::Decimal | FieldType::Money => ColKind::Decimal,
        FieldType::Boolean => ColKind::Bool,
        FieldType::Date => ColKind::Date,
        FieldType::Datetime => ColKind::DateTime,
        FieldType::User | FieldType::Relation => ColKind::Uuid,
        FieldType::Multiselect | FieldType::Json => ColKind::Json,
        // The real kind comes from the formula's result type (see `Field::col_kind`).
        FieldType::Formula => ColKind::Text,
        FieldType::Summary => ColKind::DateTime,
    }
}

/// Column holding a money field's currency.
pub fn currency_column(field: &str) -> String {
    format!("{field}__currency")
}

/// Column holding the time of a stage field's last change.
pub fn stage_changed_column(field: &str) -> String {
    format!("{field}__changed_at")
}

/// Column holding the time a record first entered `stage`.
pub fn stage_entered_column(field: &str, stage: &str) -> String {
    format!("{field}__entered_{stage}")
}

/// Column holding the days a record spent in `stage` over its finished stays (the stay under
/// way is counted from the stage's last change; NULL when no stay in it has ended).
pub fn stage_days_column(field: &str, stage: &str) -> String {
    format!("{field}__days_{stage}")
}

/// Days per stage of the finished stays of a stage path (`(stage, entered at)` in order): each
/// stay lasts until the next entry; the last one is still under way and not counted.
pub fn finished_stays<S: AsRef<str>>(
    path: &[(S, chrono::DateTime<chrono::Utc>)],
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = vec![];
    for w in path.windows(2) {
        let days = (w[1].1 - w[0].1).num_milliseconds() as f64 / 86_400_000.0;
        let s = w[0].0.as_ref();
        match out.iter_mut().find(|(k, _)| k == s) {
            Some((_, d)) => *d += days,
            None => out.push((s.to_owned(), days)),
        }
    }
    out
}

/// The SQL table of an entity.
pub fn table_name(app: &str, entity: &str) -> String {
    format!("{app}__{entity}")
}

impl Entity {
    /// The JSON Schema (draft 2020-12) a record of this entity is validated against.
    pub fn json_schema(&self) -> serde_json::Value {
        crate::schema::entity_schema(&self.fields)
    }
}
