//! # trellis-form — the form engine
//!
//! Entity schemas written as JSON ([`def`]) are checked and compiled ([`compile`]) into a
//! [`model::App`]: per entity a JSON Schema validator and a real SQL table with one typed column
//! per field. Records are validated by that schema plus the checks it cannot express, and written
//! in one transaction together with their field history and an outbox event ([`store`]).
//! Definitions evolve through migration plans ([`plan`], [`apps`]).
//!
//! The engine is a library: no HTTP, no global state. Callers hand it a [`db::Db`] and the time
//! (see [`Clock`]); the server wires it to the REST API.
#![warn(missing_docs)]

pub mod apps;
pub mod audit;
pub mod bundle;
pub mod compile;
pub mod db;
pub mod def;
pub mod error;
pub mod formula;
pub mod model;
pub mod plan;
pub mod query;
pub mod roles;
pub mod rollup;
pub(crate) mod schema;
pub mod sheet;
mod sqlite_bulk;
pub mod store;
pub mod summary;
pub mod testing;
pub mod users;
pub mod values;

pub use error::{FormError, Problem, Result};

use chrono::{DateTime, Utc};

/// Where the engines get the time from. Tests hand in a clock they control.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until moved; for tests.
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: DateTime<Utc>) -> Self {
        ManualClock(std::sync::Mutex::new(t))
    }

    /// Move the clock forward.
    pub fn advance(&self, d: chrono::Duration) {
        let mut t = self.0.lock().expect("clock lock");
        *t += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock")
    }
}
