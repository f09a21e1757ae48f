//! Trellis workflow engine.
//!
//! A workflow is JSON ([`def`]): a trigger and a graph of nodes and edges. [`compile`] checks a
//! whole app's workflows against its compiled entities and builds each graph with petgraph;
//! conditions are sandboxed rhai ([`script`]), texts are minijinja templates with fuel and size
//! limits ([`template`]). The [`runner`] turns the form engine's outbox events into durable runs,
//! advances them under leases and keeps a log of every step; [`actions`] holds the actions that
//! only touch the database (inline and queued runs share them). [`calendar`] does working-day
//! arithmetic; [`netguard`] keeps outbound requests off internal addresses.
//!
//! No HTTP server and no global state here: the host hands in the database, the clock and the
//! settings (SMTP relay, template variables, outbound allow-list).

pub mod actions;
pub mod calendar;
pub mod compile;
pub mod def;
pub mod netguard;
pub mod runner;
pub mod schedule;
pub mod script;
pub mod template;

pub use compile::{compile, Flows, Workflow};
pub use runner::{Runtime, Settings, Smtp, SmtpTls};
