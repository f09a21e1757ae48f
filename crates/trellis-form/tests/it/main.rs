//! Integration tests of the form engine against real SQLite and PostgreSQL databases.
//! Every test runs on both backends (PostgreSQL is skipped with a message when unreachable,
//! unless TRELLIS_REQUIRE_POSTGRES=1).

mod bulk;
mod common;
mod definitions;
mod formulas;
mod listing;
mod migrations;
mod records;
mod regressions;
mod sqlite_settings;
mod summaries;
mod transactions;
mod users;
