//! End-to-end tests: a real `trellis` server on 127.0.0.1 (port 0), driven over HTTP with
//! reqwest, on SQLite and on PostgreSQL.

mod api_surface;
mod apps_api;
mod helpers;
mod identity_api;
mod permission_matrix;
mod permissions_api;
mod records_api;
mod reports_api;
mod sinks;
mod workflow_engine;
mod workflows_api;
