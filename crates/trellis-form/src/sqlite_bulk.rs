//! Bulk inserts on SQLite straight through its C API: the one module of Trellis with `unsafe`.
//!
//! sqlx runs every SQLite statement on a worker thread of its own, and its cost per bound
//! parameter makes multi-row `VALUES` statements slow, so bulk rows used to travel as one JSON
//! text per 2,000 rows that SQLite decoded again (`json_each`). Here the write transaction's own
//! connection is borrowed from sqlx ([`sqlx::sqlite::LockedSqliteHandle`]: while it is held,
//! sqlx's worker makes no call on the connection), one single-row `INSERT` is prepared, and each
//! row is bound and stepped on the calling thread: no JSON, no thread hand-off per statement
//! (see docs/benchmarks.md for what it changed).
//!
//! Values are bound exactly as [`crate::db`] binds them through sqlx (text for UUIDs, dates,
//! instants and JSON, a REAL for decimals, an integer for booleans), so the stored values are
//! the same whichever path wrote them. A savepoint around the rows makes the insert all or
//! nothing, as one multi-row statement would be.
//!
//! Safety rests on three things, each checked where it is used: the handle comes from a live
//! `LockedSqliteHandle` borrowed for the whole call; every statement handle is finalised by
//! [`Stmt`]'s `Drop` before the borrow ends; text is bound with `SQLITE_TRANSIENT`, so SQLite
//! copies it before the Rust string goes away.
#![allow(unsafe_code)]

use crate::db::{sqlite_date, sqlite_datetime, Value};
use libsqlite3_sys as ffi;
use rust_decimal::prelude::ToPrimitive;
use std::borrow::Cow;
use std::ffi::{c_char, c_int, CStr, CString};

/// An error SQLite returned, in sqlx's shape, so callers tell a unique violation from other
/// failures the same way for both paths.
#[derive(Debug)]
pub(crate) struct BulkError {
    /// SQLite's extended result code.
    code: c_int,
    message: String,
}

impl std::fmt::Display for BulkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for BulkError {}

impl sqlx::error::DatabaseError for BulkError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// Hands each of a row's values, in column order, to its second argument.
pub(crate) type Cells<'a, T> = dyn Fn(&T, &mut dyn FnMut(&Value)) + 'a;

/// The connection's last error.
fn last_error(db: *mut ffi::sqlite3) -> BulkError {
    // SAFETY: `db` is the live handle of the locked connection (see `insert`); `sqlite3_errmsg`
    // returns a NUL-terminated string owned by SQLite, copied here before any other call.
    unsafe {
        BulkError {
            code: ffi::sqlite3_extended_errcode(db),
            message: CStr::from_ptr(ffi::sqlite3_errmsg(db))
                .to_string_lossy()
                .into_owned(),
        }
    }
}

/// Run SQL without results (the savepoint statements).
fn exec(db: *mut ffi::sqlite3, sql: &str) -> Result<(), BulkError> {
    let text = CString::new(sql).expect("no NUL in generated SQL");
    // SAFETY: `db` is the live locked handle; `text` outlives the call; no callback is passed.
    let rc = unsafe {
        ffi::sqlite3_exec(
            db,
            text.as_ptr(),
            None,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(last_error(db))
    }
}

/// A prepared statement, finalised when dropped.
struct Stmt {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl Stmt {
    fn prepare(db: *mut ffi::sqlite3, sql: &str) -> Result<Stmt, BulkError> {
        let text = CString::new(sql).expect("no NUL in generated SQL");
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `db` is the live locked handle; `text` is NUL-terminated and outlives the
        // call (`-1`: read up to the NUL); `stmt` receives the new statement or NULL.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(db, text.as_ptr(), -1, &mut stmt, std::ptr::null_mut())
        };
        if rc != ffi::SQLITE_OK || stmt.is_null() {
            return Err(last_error(db));
        }
        Ok(Stmt { db, stmt })
    }

    fn bind_text(&self, i: c_int, s: &str) -> c_int {
        let Ok(len) = c_int::try_from(s.len()) else {
            return ffi::SQLITE_TOOBIG;
        };
        // SAFETY: `stmt` is live; SQLITE_TRANSIENT makes SQLite copy the bytes before
        // returning, so `s` may go away afterwards; `len` is the exact byte length.
        unsafe {
            ffi::sqlite3_bind_text(
                self.stmt,
                i,
                s.as_ptr() as *const c_char,
                len,
                ffi::SQLITE_TRANSIENT(),
            )
        }
    }

    /// Bind `v` to parameter `i` (1-based) as `crate::db` binds it through sqlx.
    fn bind(&self, i: c_int, v: &Value) -> c_int {
        // SAFETY (every arm): `stmt` is a live prepared statement and `i` is checked against
        // its parameter count by SQLite, which answers SQLITE_RANGE when out of range.
        match v {
            Value::Null(_) => unsafe { ffi::sqlite3_bind_null(self.stmt, i) },
            Value::Bool(b) => unsafe { ffi::sqlite3_bind_int64(self.stmt, i, i64::from(*b)) },
            Value::Int(n) => unsafe { ffi::sqlite3_bind_int64(self.stmt, i, *n) },
            Value::Decimal(d) => match d.to_f64() {
                Some(f) => unsafe { ffi::sqlite3_bind_double(self.stmt, i, f) },
                None => unsafe { ffi::sqlite3_bind_null(self.stmt, i) },
            },
            Value::Text(s) => self.bind_text(i, s),
            Value::Uuid(u) => {
                let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                self.bind_text(i, u.hyphenated().encode_lower(&mut buf))
            }
            Value::Date(d) => self.bind_text(i, &sqlite_date(d)),
            Value::DateTime(t) => self.bind_text(i, &sqlite_datetime(t)),
            Value::Json(j) => self.bind_text(i, &j.to_string()),
        }
    }
}

impl Drop for Stmt {
    fn drop(&mut self) {
        // SAFETY: `stmt` came from a successful prepare on `db` and is finalised exactly once.
        unsafe {
            ffi::sqlite3_finalize(self.stmt);
        }
    }
}

/// Insert `rows` into the table of `insert` (`INSERT INTO "t" ("a", …) VALUES (?1, …)` with
/// `width` parameters): `cells(row, cell)` hands each of a row's values to `cell`, in column
/// order. All rows or none: a failure rolls back to a savepoint taken before the first row.
/// Refused outside a transaction, so rows can never be committed behind the caller's back
/// (after SQLite rolled a failed transaction back on its own, say).
pub(crate) fn insert<T>(
    handle: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
    insert: &str,
    width: usize,
    rows: &[T],
    cells: &Cells<'_, T>,
) -> Result<u64, BulkError> {
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is the live handle of the locked connection.
    if unsafe { ffi::sqlite3_get_autocommit(db) } != 0 {
        return Err(BulkError {
            code: ffi::SQLITE_MISUSE,
            message: "a bulk insert needs an open transaction".into(),
        });
    }
    if rows.len() == 1 {
        // One row is one statement, atomic without a savepoint.
        return insert_rows(db, insert, width, rows, cells);
    }
    let savepoint = Savepoint::take(db)?;
    let n = insert_rows(db, insert, width, rows, cells)?;
    savepoint.release()?;
    Ok(n)
}

/// A savepoint that is rolled back and released when dropped, unless [`Savepoint::release`]
/// kept its work: on an error and on a panic inside the rows' `cells`, none of the rows stay.
struct Savepoint {
    db: *mut ffi::sqlite3,
    open: bool,
}

impl Savepoint {
    fn take(db: *mut ffi::sqlite3) -> Result<Savepoint, BulkError> {
        exec(db, "SAVEPOINT trellis_bulk")?;
        Ok(Savepoint { db, open: true })
    }

    /// Keep the work. If releasing fails, `Drop` still rolls it back.
    fn release(mut self) -> Result<(), BulkError> {
        exec(self.db, "RELEASE trellis_bulk")?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Savepoint {
    fn drop(&mut self) {
        // Release only what was rolled back: a failed rollback must not merge the rows into
        // the outer transaction (the caller has an error and will not commit).
        if self.open && exec(self.db, "ROLLBACK TO trellis_bulk").is_ok() {
            let _ = exec(self.db, "RELEASE trellis_bulk");
        }
    }
}

fn insert_rows<T>(
    db: *mut ffi::sqlite3,
    insert: &str,
    width: usize,
    rows: &[T],
    cells: &Cells<'_, T>,
) -> Result<u64, BulkError> {
    let stmt = Stmt::prepare(db, insert)?;
    let mut n = 0;
    for row in rows {
        let mut i: c_int = 0;
        let mut rc = ffi::SQLITE_OK;
        cells(row, &mut |v| {
            i += 1;
            if rc == ffi::SQLITE_OK {
                rc = stmt.bind(i, v);
            }
        });
        if rc != ffi::SQLITE_OK {
            // SAFETY: `sqlite3_errstr` returns a static NUL-terminated English message.
            let message = unsafe { CStr::from_ptr(ffi::sqlite3_errstr(rc)) };
            return Err(BulkError {
                code: rc,
                message: format!("binding a value failed: {}", message.to_string_lossy()),
            });
        }
        if i as usize != width {
            return Err(BulkError {
                code: ffi::SQLITE_RANGE,
                message: format!("a row has {i} values for {width} columns"),
            });
        }
        // SAFETY: `stmt` is live and every parameter is bound; `sqlite3_reset` readies it for
        // the next row (the bindings stay and are all overwritten by the next row).
        let rc = unsafe { ffi::sqlite3_step(stmt.stmt) };
        if rc != ffi::SQLITE_DONE {
            let err = last_error(stmt.db);
            unsafe { ffi::sqlite3_reset(stmt.stmt) };
            return Err(err);
        }
        unsafe { ffi::sqlite3_reset(stmt.stmt) };
        n += 1;
    }
    Ok(n)
}
