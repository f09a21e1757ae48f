//! Trellis report engine: declarative metric specs compiled to SQL for SQLite and PostgreSQL.
//!
//! An app's `reports` section declares metrics (aggregates, ratios, conversions, funnels, time in
//! stage, durations, weighted forecasts, derived arithmetic) and dashboards. [`Reports::compile`]
//! checks them against the app's entities once; [`engine::plan`] checks a query against them;
//! [`engine::run`] answers it with one SQL statement per entity and time anchor, stitched by
//! dimension values in Rust. No SQL text comes from a spec or a query: names resolve against the
//! compiled model and values are bound parameters. There is no HTTP and no global state here:
//! the database, the clock's `now` and the caller's visibility are handed in.

#![warn(missing_docs)]

pub mod alerts;
pub mod dialect;
pub mod engine;
pub mod expr;
pub mod lower;
pub mod model;
pub mod query;
pub mod rollup;
pub mod time;
pub mod verify;

pub use engine::{drill, plan, run, Answer, DrillPage, Plan, Visibility};
pub use model::Reports;
pub use query::{DrillQuery, Query};
pub use verify::verify;
