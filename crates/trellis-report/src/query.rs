//! The query a client sends: which metrics, sliced how, over which time.

use serde::{Deserialize, Serialize};
use trellis_form::query::Filter;

/// A metric query (`POST /api/v1/apps/{app}/reports/query`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// Metric names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// One metric name (same as `metrics: [name]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Dimensions: fields of the metric's entity or one many-to-one step away.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    /// Record filters (same operators as record lists), applied to every metric.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Time range and buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeQuery>,
    /// IANA time zone of buckets and ranges (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// First day of a week bucket: `monday` (default) or `sunday`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub week_start: Option<String>,
    /// `previous_period` or `previous_year`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<String>,
    /// Compare a period still under way with the same elapsed part of the previous one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compare_to_date: bool,
    /// Mark rows whose change crosses a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<FlagRule>,
    /// Columns to sort by; `-name` sorts descending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sort: Vec<String>,
    /// Most rows returned (default 10,000, at most 50,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `false` answers from the base tables even where a rollup fits (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rollups: Option<bool>,
}

/// The time part of a query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeQuery {
    /// Anchor every metric on this field instead of its own time field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `day`, `week`, `month`, `quarter` or `year`: one row per bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grain: Option<String>,
    /// First local date in range (`YYYY-MM-DD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// First local date after the range (half-open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A named range (`this_quarter`, `last_30_days`, …) instead of from/to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
}

/// A rule that marks rows of a compared query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagRule {
    /// The metric whose change is tested.
    pub metric: String,
    /// Flag when the change in percent is at most this (e.g. -30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_pct_lte: Option<f64>,
    /// Flag when the change in percent is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_pct_gte: Option<f64>,
}

/// A drill-down request: a query, one row of its answer, and which number to open.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillQuery {
    /// The query whose row is opened.
    #[serde(flatten)]
    pub query: Query,
    /// The row's dimension values (and `period`, `stage`) as the answer gave them.
    #[serde(default)]
    pub row: serde_json::Map<String, serde_json::Value>,
    /// For a ratio or conversion: `numerator` or `denominator`; for a funnel: `entered` or
    /// `advanced`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    /// Page size (1–1000, default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Cursor from the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
