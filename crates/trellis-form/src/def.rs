//! App definition types: exactly what a user writes in JSON.
//!
//! These types are the public, stable file format. They are deliberately kept apart from the
//! compiled forms in [`crate::model`], which the engine runs: a definition is parsed here, checked
//! and compiled once by [`crate::compile`], and never re-checked at run time.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A label given per language (`{"en": "Lead", "zh-CN": "线索"}`) or as one plain string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    /// One label for every language.
    Plain(String),
    /// A label per language tag.
    PerLanguage(BTreeMap<String, String>),
}

impl Label {
    /// The label in `lang`, else English, else any language, else `fallback`.
    pub fn get<'a>(&'a self, lang: &str, fallback: &'a str) -> &'a str {
        match self {
            Label::Plain(s) => s,
            Label::PerLanguage(m) => m
                .get(lang)
                .or_else(|| m.get("en"))
                .or_else(|| m.values().next())
                .map(String::as_str)
                .unwrap_or(fallback),
        }
    }

    /// Every label text, in all languages (used to match spreadsheet headers).
    pub fn all(&self) -> Vec<&str> {
        match self {
            Label::Plain(s) => vec![s.as_str()],
            Label::PerLanguage(m) => m.values().map(String::as_str).collect(),
        }
    }
}

/// A whole app: its entities (and, as later engines arrive, workflows, reports and roles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppDef {
    /// Stable key of the app, used in URLs and table names (`crm`).
    pub key: String,
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    /// IANA time zone used for date buckets and working-day calendars.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Email of the user who owns records that nobody else was assigned to. Defaults to the
    /// bootstrap admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_owner: Option<String>,
    /// The entities, in order.
    pub entities: Vec<EntityDef>,
    /// Workflow definitions; kept verbatim until the workflow engine compiles them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workflows: Vec<serde_json::Value>,
    /// Report definitions; kept verbatim until the report engine compiles them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<serde_json::Value>,
    /// Role definitions, compiled by [`crate::roles`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<serde_json::Value>,
    /// Calendars (working days, holidays); kept verbatim until the workflow engine uses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calendars: Vec<serde_json::Value>,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

/// One entity: a form, and a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityDef {
    /// Stable key (`opportunity`).
    pub key: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    /// Fields, in form order.
    pub fields: Vec<FieldDef>,
    /// Which field changes are recorded, and for how long.
    #[serde(default)]
    pub history: HistoryDef,
    /// Indexes over several columns, for the reports and lists that read this entity most
    /// (one-field indexes come from a field's `indexed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexDef>,
}

/// An index over several columns of an entity, in order: field keys, the system columns
/// (`created_at`, `owner` …) and a stage field's own columns (`stage__changed_at`,
/// `stage__entered_won`, `stage__days_won`). A report that reads only these columns is answered
/// from the index, which is much smaller than the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexDef {
    /// The columns, most selective filter first.
    pub columns: Vec<String>,
}

/// Field-history policy of an entity. Stage history is always kept, whatever this says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryDef {
    /// `"all"`, `"none"`, or a list of field keys.
    #[serde(default = "default_track")]
    pub track: Track,
    /// Days to keep history rows of non-stage fields; absent means forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
}

impl Default for HistoryDef {
    fn default() -> Self {
        HistoryDef {
            track: Track::Keyword(TrackKeyword::All),
            retention_days: None,
        }
    }
}

fn default_track() -> Track {
    Track::Keyword(TrackKeyword::All)
}

/// Which fields the history tracks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Track {
    /// `"all"` or `"none"`.
    Keyword(TrackKeyword),
    /// Only these fields (and the stage field).
    Fields(Vec<String>),
}

/// `"all"` or `"none"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKeyword {
    /// Every field.
    All,
    /// No field but the stage field.
    None,
}

/// The type of a field. The JSON form and the SQL column of each are listed in
/// `docs/reference/app-definition.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Short single-line text.
    Text,
    /// Multi-line text.
    LongText,
    /// 64-bit signed integer.
    Integer,
    /// Exact decimal with a fixed scale, as a JSON string (`"12.50"`).
    Decimal,
    /// A decimal amount with an ISO 4217 currency.
    Money,
    /// `true` / `false`.
    Boolean,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// An instant, RFC 3339; stored in UTC.
    Datetime,
    /// An email address.
    Email,
    /// A phone number.
    Phone,
    /// An `http(s)` URL.
    Url,
    /// One option key.
    Select,
    /// A list of distinct option keys.
    Multiselect,
    /// A reference to a user (UUID).
    User,
    /// A many-to-one reference to a record of another entity (UUID).
    Relation,
    /// The pipeline field: one stage key.
    Stage,
    /// Any JSON, optionally checked against a JSON Schema.
    Json,
    /// Computed from the other fields by a rhai expression on every write; read-only.
    Formula,
    /// The first or last creation (or update) time of the records of another entity that point
    /// at this record, kept by every write of theirs; read-only.
    Summary,
}

impl FieldType {
    /// The snake_case name used in definitions.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::LongText => "long_text",
            FieldType::Integer => "integer",
            FieldType::Decimal => "decimal",
            FieldType::Money => "money",
            FieldType::Boolean => "boolean",
            FieldType::Date => "date",
            FieldType::Datetime => "datetime",
            FieldType::Email => "email",
            FieldType::Phone => "phone",
            FieldType::Url => "url",
            FieldType::Select => "select",
            FieldType::Multiselect => "multiselect",
            FieldType::User => "user",
            FieldType::Relation => "relation",
            FieldType::Stage => "stage",
            FieldType::Json => "json",
            FieldType::Formula => "formula",
            FieldType::Summary => "summary",
        }
    }
}

/// One field of an entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDef {
    /// Stable key: the JSON property and the SQL column.
    pub key: String,
    /// The field type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    /// A value must be present (not missing, not null).
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    /// No two records share a non-null value.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unique: bool,
    /// Build an index on the column (relations, users and stages always get one).
    #[serde(default, skip_serializing_if = "is_false")]
    pub indexed: bool,
    /// Value used when a create leaves the field out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// Smallest allowed number (integer, decimal, money), or earliest date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<serde_json::Value>,
    /// Largest allowed number, or latest date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<serde_json::Value>,
    /// Shortest allowed text, in characters (or fewest options for multiselect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<u32>,
    /// Longest allowed text, in characters (or most options for multiselect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
    /// A regular expression the whole text must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Options of a select or multiselect field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<OptionDef>,
    /// Target entity of a relation field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Digits after the decimal point of a decimal or money field (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<u32>,
    /// Default ISO 4217 currency of a money field (default `CNY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The ordered stages of a stage field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageDef>,
    /// A JSON Schema for the value of a json field. Only local `$ref`s are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// The expression of a formula field (rhai), e.g. `amount * 0.13`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formula: Option<String>,
    /// The stored type of a formula field's result (default `decimal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<crate::formula::ResultType>,
    /// What a summary field summarises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SummaryDef>,
    /// Help text shown beside the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Label>,
}

/// A summary field's source: the records of `entity` whose relation `via` points at this
/// record, and the earliest (`min`) or latest (`max`) of their `of` column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryDef {
    /// The related entity (`opportunity`).
    pub entity: String,
    /// Its relation field pointing at this entity (`lead`).
    pub via: String,
    /// `min` or `max`.
    pub agg: SummaryAgg,
    /// The related records' column: `created_at` (the default) or `updated_at`.
    #[serde(default = "default_summary_of")]
    pub of: String,
}

fn default_summary_of() -> String {
    "created_at".to_owned()
}

/// How a summary field combines the related records' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryAgg {
    /// The earliest.
    Min,
    /// The latest.
    Max,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One option of a select or multiselect field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionDef {
    /// The stored value.
    pub key: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
}

/// One stage of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    /// The stored value (`proposal`).
    pub key: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    /// Win probability between 0 and 1, used by the forecast.
    pub probability: f64,
    /// Whether the stage is open, won or lost.
    #[serde(default = "default_stage_kind")]
    pub kind: StageKind,
    /// Fields that must be filled for a record to enter this stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entry_criteria: Vec<String>,
}

fn default_stage_kind() -> StageKind {
    StageKind::Open
}

/// The kind of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// Still in play.
    Open,
    /// Closed, won.
    Won,
    /// Closed, lost.
    Lost,
}
