//! The form engine's errors. No HTTP in here: the server maps each variant to a status and a
//! stable problem code in one place.

use serde::Serialize;

/// One problem with a piece of input, located by a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// JSON pointer into the document that was sent (`/records/3/amount`, `/entities/0/key`).
    pub path: String,
    /// Stable machine-readable code (`required`, `unknown_option`, …).
    pub code: &'static str,
    /// A sentence a business user understands.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            code,
            message: message.into(),
        }
    }

    /// The same problem, with `prefix` put before its path (a batch puts `/records/N`).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.path = format!("{prefix}{}", self.path);
        self
    }
}

/// Escape one JSON-pointer segment (RFC 6901).
pub fn pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Everything the form engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum FormError {
    /// A record failed validation; every problem is listed.
    #[error("the record is invalid ({} problem(s))", .0.len())]
    Invalid(Vec<Problem>),
    /// An app definition failed its checks; every problem is listed.
    #[error("the app definition is invalid ({} problem(s))", .0.len())]
    Definition(Vec<Problem>),
    /// A list or filter query is malformed.
    #[error("the query is invalid ({} problem(s))", .0.len())]
    Query(Vec<Problem>),
    /// The migration plan contains destructive steps and they were not allowed.
    #[error("the change would destroy data; re-run with allow_destructive to apply it")]
    Destructive(Vec<Problem>),
    /// The migration could not be applied to the existing data (e.g. duplicates for a new unique).
    #[error("the change does not fit the existing data")]
    MigrationConflict(Vec<Problem>),
    /// No such app.
    #[error("app `{0}` does not exist")]
    AppNotFound(String),
    /// No such entity in the app.
    #[error("entity `{0}` does not exist in this app")]
    EntityNotFound(String),
    /// No such record.
    #[error("record not found")]
    RecordNotFound,
    /// No such user or team.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The record changed since the caller read it.
    #[error("the record was changed by someone else: you sent version {expected}, it is now at version {current}")]
    VersionConflict {
        /// Version the caller sent.
        expected: i64,
        /// Version in the database.
        current: i64,
    },
    /// The write conflicts with existing data: a unique value taken by a concurrent writer, or a
    /// record still referenced by others.
    #[error("the write conflicts with existing data")]
    Conflict(Vec<Problem>),
    /// The engine is wired wrongly (a bug of the caller, not of the input).
    #[error("internal error: {0}")]
    Internal(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration of the system tables failed.
    #[error("system migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Result alias of the form engine.
pub type Result<T, E = FormError> = std::result::Result<T, E>;
