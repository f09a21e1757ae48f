//! The database boundary: one enum over the two backends, chosen once at start.
//!
//! Every query the engines run is plain SQL text with `$1, $2, …` placeholders (both SQLite and
//! PostgreSQL accept them) and a list of typed [`Value`]s. The few places where the backends
//! differ — column types, binding of dates and UUIDs, case-insensitive matching — are answered by
//! [`Backend`], so the store code is written once. Identifiers are quoted in one function,
//! [`quote`], which also refuses anything that is not a plain key.
//!
//! SQLite is configured explicitly (see [`SqliteSettings`]): WAL, `synchronous=NORMAL` by default
//! (an acknowledged write survives a killed process; a power loss can lose the last few
//! transactions, never corrupt the file; `FULL` closes that gap at some write cost), foreign keys
//! on, a busy timeout, and every write transaction opened with `BEGIN IMMEDIATE` on a
//! single write connection held by one transaction at a time, so two writers never fail with
//! "database is locked".

use crate::error::Result;
use crate::model::ColKind;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous, SqliteTransactionManager,
};
use sqlx::{Connection, Postgres, Row, Sqlite, Transaction, TransactionManager, ValueRef};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Which SQL dialect a database speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The SQL column type of a column kind.
    pub fn column_type(self, kind: ColKind) -> &'static str {
        match (self, kind) {
            (Backend::Sqlite, ColKind::Bool) => "INTEGER",
            (Backend::Sqlite, ColKind::Int) => "INTEGER",
            (Backend::Sqlite, ColKind::Decimal) => "REAL",
            (Backend::Sqlite, _) => "TEXT",
            (Backend::Postgres, ColKind::Bool) => "BOOLEAN",
            (Backend::Postgres, ColKind::Int) => "BIGINT",
            (Backend::Postgres, ColKind::Decimal) => "NUMERIC",
            (Backend::Postgres, ColKind::Text) => "TEXT",
            (Backend::Postgres, ColKind::Uuid) => "UUID",
            (Backend::Postgres, ColKind::Date) => "DATE",
            (Backend::Postgres, ColKind::DateTime) => "TIMESTAMPTZ",
            (Backend::Postgres, ColKind::Json) => "JSONB",
        }
    }

    /// The case-insensitive LIKE operator.
    pub fn ilike(self) -> &'static str {
        match self {
            Backend::Sqlite => "LIKE",
            Backend::Postgres => "ILIKE",
        }
    }

    /// SQL that is true when the JSON array in `col` contains the text bound at `param`.
    pub fn json_array_contains(self, col: &str, param: &str) -> String {
        match self {
            Backend::Sqlite => {
                format!("EXISTS (SELECT 1 FROM json_each({col}) WHERE json_each.value = {param})")
            }
            Backend::Postgres => format!("{col} @> jsonb_build_array(CAST({param} AS TEXT))"),
        }
    }
}

/// Quote an identifier. Identifiers come from checked definitions; this refuses anything else so
/// that no unchecked text can ever reach SQL.
pub fn quote(ident: &str) -> String {
    assert!(
        !ident.is_empty()
            && ident
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "identifier {ident:?} was not checked"
    );
    format!("\"{ident}\"")
}

/// A value bound to a query parameter or read from a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL of a column kind (PostgreSQL needs the type of a null parameter).
    Null(ColKind),
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Exact decimal.
    Decimal(Decimal),
    /// Text.
    Text(String),
    /// UUID.
    Uuid(Uuid),
    /// Date.
    Date(NaiveDate),
    /// UTC instant.
    DateTime(DateTime<Utc>),
    /// JSON.
    Json(serde_json::Value),
}

impl Value {
    /// Whether this is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null(_))
    }

    /// Nullable UUID.
    pub fn opt_uuid(u: Option<Uuid>) -> Value {
        u.map(Value::Uuid).unwrap_or(Value::Null(ColKind::Uuid))
    }
}

/// The fixed-width UTC text form of an instant on SQLite: sorts lexically in time order.
pub fn sqlite_datetime(t: &DateTime<Utc>) -> String {
    let mut out = String::with_capacity(27);
    push_sqlite_datetime(&mut out, t);
    out
}

/// The text form of a date on SQLite.
pub(crate) fn sqlite_date(d: &NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

/// [`sqlite_datetime`] appended to `out` (written by hand: chrono's formatter parses its
/// pattern on every call, which showed in bulk imports).
fn push_sqlite_datetime(out: &mut String, t: &DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let year = t.year();
    if !(0..=9999).contains(&year) {
        let _ = write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
        return;
    }
    let micros = t.nanosecond() % 1_000_000_000 / 1_000;
    let _ = write!(
        out,
        "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
}

/// SQL text with its bound values, built piece by piece.
#[derive(Debug, Default, Clone)]
pub struct Sql {
    /// The text, with `$n` placeholders.
    pub text: String,
    /// The values, in placeholder order.
    pub params: Vec<Value>,
}

impl Sql {
    /// Start with some text.
    pub fn new(text: impl Into<String>) -> Self {
        Sql {
            text: text.into(),
            params: vec![],
        }
    }

    /// Append text.
    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Append a quoted identifier.
    pub fn ident(&mut self, s: &str) -> &mut Self {
        self.text.push_str(&quote(s));
        self
    }

    /// Append a placeholder bound to `v`.
    pub fn bind(&mut self, v: Value) -> &mut Self {
        self.params.push(v);
        self.text.push('$');
        self.text.push_str(&self.params.len().to_string());
        self
    }

    /// A placeholder for `v`, returned as text so it can be used twice in a fragment.
    pub fn param(&mut self, v: Value) -> String {
        self.params.push(v);
        format!("${}", self.params.len())
    }
}

impl serde::Serialize for Sql {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// How SQLite is set up.
#[derive(Debug, Clone)]
pub struct SqliteSettings {
    /// `NORMAL` (default) or `FULL`; see the module docs for the trade-off.
    pub synchronous_full: bool,
    /// Connections of the read pool.
    pub readers: u32,
    /// How much of the database file each reader maps into memory (`PRAGMA mmap_size`), in MiB;
    /// 0 reads through `pread` only. Mapped pages are read without a system call and a copy,
    /// which made full scans at 1M rows 1.4–1.7× faster (docs/benchmarks.md). SQLite caps it at
    /// 2 GiB (`SQLITE_MAX_MMAP_SIZE`). The writer never maps.
    pub reader_mmap_mib: u32,
}

impl SqliteSettings {
    /// The default and the most of [`Self::reader_mmap_mib`] that SQLite uses (it caps the
    /// mapping at `SQLITE_MAX_MMAP_SIZE`, 0x7fff0000 bytes).
    pub const MAX_READER_MMAP_MIB: u32 = 2048;

    /// [`Self::reader_mmap_mib`] in bytes.
    pub fn reader_mmap_bytes(&self) -> u64 {
        u64::from(self.reader_mmap_mib) << 20
    }
}

impl Default for SqliteSettings {
    fn default() -> Self {
        SqliteSettings {
            synchronous_full: false,
            readers: 4,
            reader_mmap_mib: Self::MAX_READER_MMAP_MIB,
        }
    }
}

/// A connection pool to one of the two backends.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite: readers run in parallel; writes go through one connection.
    Sqlite {
        /// Read pool.
        read: SqlitePool,
        /// The one write connection (`None` once closed).
        write: SqliteWriter,
    },
    /// PostgreSQL.
    Postgres(PgPool),
}

/// The SQLite write connection's page cache, as `PRAGMA cache_size` takes it (negative: KiB).
const WRITER_CACHE_KIB: i64 = -64 * 1024;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl Db {
    /// Connect to `url` (`sqlite://…` / a file path, or `postgres://…`), without migrating.
    pub async fn connect(url: &str, sqlite: &SqliteSettings) -> Result<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            return Ok(Db::Postgres(pool));
        }
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        let path = path.strip_prefix("sqlite:").unwrap_or(path);
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if sqlite.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // The write connection is held, not pooled: a pool pings a connection on every release
        // (and, by default, on every acquire), two more round trips to sqlx's worker thread per
        // transaction that cost up to a millisecond each on a busy machine (docs/benchmarks.md).
        // For the same reason the readers are not pinged before use: a SQLite connection is a
        // file handle that cannot go stale.
        // The writer keeps up to 64 MiB of pages (SQLite's default is 2 MiB): a 10,000-record
        // batch dirties more than 2 MiB, and a small cache spills pages to the WAL before the
        // commit (docs/benchmarks.md, docs/operations.md).
        let writer_opts = opts
            .clone()
            .pragma("cache_size", WRITER_CACHE_KIB.to_string());
        let write = Arc::new(tokio::sync::Mutex::new(Some(
            SqliteConnection::connect_with(&writer_opts).await?,
        )));
        let read = SqlitePoolOptions::new()
            .max_connections(sqlite.readers.max(1))
            .test_before_acquire(false)
            .connect_with(
                opts.read_only(true)
                    .pragma("mmap_size", sqlite.reader_mmap_bytes().to_string()),
            )
            .await?;
        Ok(Db::Sqlite { read, write })
    }

    /// Bring the system tables up to date (append-only migrations in `migrations/<backend>`).
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Db::Sqlite { write, .. } => {
                let mut conn = write.lock().await;
                let conn = conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
                SQLITE_MIGRATOR.run(conn).await?
            }
            Db::Postgres(p) => POSTGRES_MIGRATOR.run(p).await?,
        }
        Ok(())
    }

    /// The dialect.
    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite { .. } => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// `SQLite` or `PostgreSQL`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "SQLite",
            Db::Postgres(_) => "PostgreSQL",
        }
    }

    /// Begin a write transaction (`BEGIN IMMEDIATE` on SQLite).
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite { write, .. } => Tx::Sqlite(SqliteTx::begin(write).await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// Run a read query; each row decoded by `kinds`.
    pub async fn fetch_all(&self, sql: &Sql, kinds: &[ColKind]) -> Result<Vec<Vec<Value>>> {
        Ok(match self {
            Db::Sqlite { read, .. } => sqlite_query(&sqlite_text(&sql.text), &sql.params)
                .fetch_all(read)
                .await?
                .iter()
                .map(|r| decode_sqlite(r, kinds))
                .collect::<Result<_>>()?,
            Db::Postgres(p) => pg_query(sql)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| decode_pg(r, kinds))
                .collect::<Result<_>>()?,
        })
    }

    /// Run a read query expecting at most one row.
    pub async fn fetch_optional(&self, sql: &Sql, kinds: &[ColKind]) -> Result<Option<Vec<Value>>> {
        Ok(self.fetch_all(sql, kinds).await?.into_iter().next())
    }

    /// Close the pools.
    pub async fn close(&self) {
        match self {
            Db::Sqlite { read, write } => {
                read.close().await;
                if let Some(conn) = write.lock().await.take() {
                    let _ = conn.close().await;
                }
            }
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// SQLite's one write connection, which one transaction at a time holds.
pub type SqliteWriter = Arc<tokio::sync::Mutex<Option<SqliteConnection>>>;

/// A SQLite write transaction (`BEGIN IMMEDIATE`) on the write connection, which it holds until
/// it ends; dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub struct SqliteTx {
    conn: tokio::sync::OwnedMutexGuard<Option<SqliteConnection>>,
    open: bool,
}

impl SqliteTx {
    async fn begin(write: &SqliteWriter) -> Result<SqliteTx> {
        let conn = write.clone().lock_owned().await;
        if conn.is_none() {
            return Err(sqlx::Error::PoolClosed.into());
        }
        // Open before `BEGIN` is sent: if this future is dropped while `BEGIN` is on its way,
        // the drop queues the rollback behind it (a rollback outside a transaction does nothing).
        let mut tx = SqliteTx { conn, open: true };
        SqliteTransactionManager::begin(&mut tx, Some("BEGIN IMMEDIATE".into())).await?;
        Ok(tx)
    }

    async fn commit(mut self) -> Result<()> {
        SqliteTransactionManager::commit(&mut self).await?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for SqliteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("an open transaction holds the connection")
    }
}

impl std::ops::DerefMut for SqliteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("an open transaction holds the connection")
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if self.open {
            // Queued on the connection before anything the next transaction sends.
            if let Some(c) = self.conn.as_mut() {
                SqliteTransactionManager::start_rollback(c);
            }
        }
    }
}

/// A write transaction on either backend.
#[derive(Debug)]
pub enum Tx {
    /// SQLite.
    Sqlite(SqliteTx),
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    /// The dialect.
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    /// Execute a statement; rows affected.
    pub async fn execute(&mut self, sql: &Sql) -> Result<u64> {
        Ok(match self {
            Tx::Sqlite(t) => sqlite_query(&sqlite_text(&sql.text), &sql.params)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Postgres(t) => pg_query(sql).execute(&mut **t).await?.rows_affected(),
        })
    }

    /// Insert many rows of the same columns into `table`, all or nothing; rows inserted (see
    /// [`Tx::insert_with`]).
    pub async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[Vec<Value>],
    ) -> Result<u64> {
        self.insert_with(table, columns, rows, |row: &Vec<Value>, cell| {
            row.iter().for_each(&mut *cell)
        })
        .await
    }

    /// Insert `rows` into `table`, all or nothing; rows inserted. `cells(row, cell)` hands each
    /// of a row's values, in the order of `columns`, to `cell`, so rows need not be laid out as
    /// [`Value`]s first.
    ///
    /// SQLite: one prepared single-row `INSERT` stepped per row on the transaction's own
    /// connection, through SQLite's C API ([`crate::sqlite_bulk`]). PostgreSQL: multi-row
    /// `VALUES` statements of about 300 parameters, each built while the previous one runs.
    pub async fn insert_with<T, F>(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[T],
        cells: F,
    ) -> Result<u64>
    where
        T: Sync,
        F: Fn(&T, &mut dyn FnMut(&Value)) + Clone + Send + Sync,
    {
        if rows.is_empty() {
            return Ok(0);
        }
        match self {
            Tx::Sqlite(t) => {
                let names = columns
                    .iter()
                    .map(|c| quote(c))
                    .collect::<Vec<_>>()
                    .join(", ");
                let params = (1..=columns.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!("INSERT INTO {} ({names}) VALUES ({params})", quote(table));
                let mut handle = t.lock_handle().await?;
                let mut write =
                    || crate::sqlite_bulk::insert(&mut handle, &sql, columns.len(), rows, &cells);
                // A large insert runs for milliseconds on this thread: on a multi-threaded
                // runtime, tell tokio so it moves other tasks off it meanwhile.
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                let n = if rows.len() >= 1_000 && multi_thread {
                    tokio::task::block_in_place(write)
                } else {
                    write()
                }
                .map_err(sqlx::Error::from)?;
                drop(handle);
                Ok(n)
            }
            Tx::Postgres(_) => {
                let statements = pg_insert_statements(table, columns, rows, cells);
                self.execute_pipelined(statements).await
            }
        }
    }

    /// Run `statements` in order, building each next one while the database runs the current
    /// one (the statement is on its way to PostgreSQL while the next multi-row statement is
    /// laid out). Rows affected.
    async fn execute_pipelined(&mut self, statements: Vec<Deferred<'_>>) -> Result<u64> {
        let mut rest = statements.into_iter();
        let mut next = rest.next().map(|build| build());
        let mut n = 0;
        while let Some(sql) = next.take() {
            let (result, built) = self
                .execute_while(&sql, || rest.next().map(|build| build()))
                .await;
            n += result?;
            next = built;
        }
        Ok(n)
    }

    /// Execute a statement and run `work` while the database runs it.
    async fn execute_while<T>(
        &mut self,
        sql: &Sql,
        work: impl FnOnce() -> T + Send,
    ) -> (Result<u64>, T) {
        use std::future::Future;
        use std::task::Poll;
        let mut running = std::pin::pin!(self.execute(sql));
        // One poll hands the statement to the database (sqlx's SQLite worker thread, or the
        // PostgreSQL socket); `work` runs before we wait for the answer.
        let first = std::future::poll_fn(|cx| Poll::Ready(running.as_mut().poll(cx))).await;
        let out = work();
        let result = match first {
            Poll::Ready(r) => r,
            Poll::Pending => running.await,
        };
        (result, out)
    }

    /// Run a query inside the transaction.
    pub async fn fetch_all(&mut self, sql: &Sql, kinds: &[ColKind]) -> Result<Vec<Vec<Value>>> {
        Ok(match self {
            Tx::Sqlite(t) => sqlite_query(&sqlite_text(&sql.text), &sql.params)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| decode_sqlite(r, kinds))
                .collect::<Result<_>>()?,
            Tx::Postgres(t) => pg_query(sql)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| decode_pg(r, kinds))
                .collect::<Result<_>>()?,
        })
    }

    /// Run a query expecting at most one row.
    pub async fn fetch_optional(
        &mut self,
        sql: &Sql,
        kinds: &[ColKind],
    ) -> Result<Option<Vec<Value>>> {
        Ok(self.fetch_all(sql, kinds).await?.into_iter().next())
    }

    /// Commit.
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// A statement built only when [`Tx::execute_pipelined`] reaches it.
type Deferred<'a> = Box<dyn FnOnce() -> Sql + Send + 'a>;

/// The multi-row `VALUES` statements that write `rows` into `table` on PostgreSQL (see
/// [`Tx::insert_with`]), each built only when called: about 300 parameters each, which
/// PostgreSQL was measured to take best. `cells(row, cell)` hands each of a row's values, in
/// the order of `columns`, to `cell`.
fn pg_insert_statements<'a, T, F>(
    table: &str,
    columns: &[&str],
    rows: &'a [T],
    cells: F,
) -> Vec<Deferred<'a>>
where
    T: Sync,
    F: Fn(&T, &mut dyn FnMut(&Value)) + Clone + Send + Sync + 'a,
{
    let names = columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let head = format!("INSERT INTO {} ({names}) VALUES ", quote(table));
    let per = (300 / columns.len().max(1)).max(1);
    rows.chunks(per)
        .map(|chunk| {
            let (head, cells) = (head.clone(), cells.clone());
            Box::new(move || {
                let mut sql = Sql::new(head);
                for (r, row) in chunk.iter().enumerate() {
                    sql.push(if r == 0 { "(" } else { ", (" });
                    let mut first = true;
                    cells(row, &mut |v| {
                        if !first {
                            sql.push(", ");
                        }
                        first = false;
                        sql.bind(v.clone());
                    });
                    sql.push(")");
                }
                sql
            }) as Deferred<'a>
        })
        .collect()
}

/// `$n` placeholders as SQLite's numbered `?n`: SQLite looks every `$name` parameter up among
/// the names seen so far while preparing (quadratic in the number of parameters), but reads the
/// number of a `?n` directly. The builder only ever writes `$` before a digit in placeholders
/// (identifiers are `[a-z0-9_]`, values are bound, JSON paths read `'$.'`).
fn sqlite_text(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    if !bytes
        .windows(2)
        .any(|w| w[0] == b'$' && w[1].is_ascii_digit())
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn sqlite_query<'q>(text: &'q str, params: &'q [Value]) -> SqliteQuery<'q> {
    let mut q = sqlx::query(text);
    for v in params {
        q = match v {
            Value::Null(_) => q.bind(None::<String>),
            Value::Bool(b) => q.bind(*b),
            Value::Int(i) => q.bind(*i),
            Value::Decimal(d) => q.bind(d.to_f64()),
            Value::Text(s) => q.bind(s.as_str()),
            Value::Uuid(u) => q.bind(u.to_string()),
            Value::Date(d) => q.bind(sqlite_date(d)),
            Value::DateTime(t) => q.bind(sqlite_datetime(t)),
            Value::Json(j) => q.bind(j.to_string()),
        };
    }
    q
}

fn pg_query(sql: &Sql) -> PgQuery<'_> {
    let mut q = sqlx::query(&sql.text);
    for v in &sql.params {
        q = match v {
            Value::Null(k) => match k {
                ColKind::Bool => q.bind(None::<bool>),
                ColKind::Int => q.bind(None::<i64>),
                ColKind::Decimal => q.bind(None::<Decimal>),
                ColKind::Text => q.bind(None::<String>),
                ColKind::Uuid => q.bind(None::<Uuid>),
                ColKind::Date => q.bind(None::<NaiveDate>),
                ColKind::DateTime => q.bind(None::<DateTime<Utc>>),
                ColKind::Json => q.bind(None::<sqlx::types::Json<serde_json::Value>>),
            },
            Value::Bool(b) => q.bind(*b),
            Value::Int(i) => q.bind(*i),
            Value::Decimal(d) => q.bind(*d),
            Value::Text(s) => q.bind(s.as_str()),
            Value::Uuid(u) => q.bind(*u),
            Value::Date(d) => q.bind(*d),
            Value::DateTime(t) => q.bind(*t),
            Value::Json(j) => q.bind(sqlx::types::Json(j)),
        };
    }
    q
}

fn corrupt(col: usize, what: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("column {col}: {what}").into())
}

fn decode_sqlite(row: &SqliteRow, kinds: &[ColKind]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        if row.try_get_raw(i)?.is_null() {
            out.push(Value::Null(*k));
            continue;
        }
        let v = match k {
            ColKind::Bool => Value::Bool(row.try_get_unchecked::<i64, _>(i)? != 0),
            ColKind::Int => Value::Int(row.try_get_unchecked::<i64, _>(i)?),
            ColKind::Decimal => {
                let f: f64 = row.try_get_unchecked(i)?;
                Value::Decimal(Decimal::try_from(f).map_err(|_| corrupt(i, "not a decimal"))?)
            }
            ColKind::Text => Value::Text(row.try_get_unchecked(i)?),
            ColKind::Uuid => {
                let s: String = row.try_get_unchecked(i)?;
                Value::Uuid(Uuid::parse_str(&s).map_err(|_| corrupt(i, "not a uuid"))?)
            }
            ColKind::Date => {
                let s: String = row.try_get_unchecked(i)?;
                Value::Date(
                    NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                        .map_err(|_| corrupt(i, "not a date"))?,
                )
            }
            ColKind::DateTime => {
                let s: String = row.try_get_unchecked(i)?;
                Value::DateTime(
                    DateTime::parse_from_rfc3339(&s)
                        .map_err(|_| corrupt(i, "not a datetime"))?
                        .with_timezone(&Utc),
                )
            }
            ColKind::Json => {
                let s: String = row.try_get_unchecked(i)?;
                Value::Json(serde_json::from_str(&s).map_err(|_| corrupt(i, "not json"))?)
            }
        };
        out.push(v);
    }
    Ok(out)
}

fn decode_pg(row: &PgRow, kinds: &[ColKind]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        if row.try_get_raw(i)?.is_null() {
            out.push(Value::Null(*k));
            continue;
        }
        let v = match k {
            ColKind::Bool => Value::Bool(row.try_get(i)?),
            // Literals and some aggregates come back as INT4; columns are INT8.
            ColKind::Int => Value::Int(
                row.try_get::<i64, _>(i)
                    .or_else(|_| row.try_get::<i32, _>(i).map(i64::from))?,
            ),
            ColKind::Decimal => Value::Decimal(row.try_get(i)?),
            ColKind::Text => Value::Text(row.try_get(i)?),
            ColKind::Uuid => Value::Uuid(row.try_get(i)?),
            ColKind::Date => Value::Date(row.try_get(i)?),
            ColKind::DateTime => Value::DateTime(row.try_get(i)?),
            ColKind::Json => {
                Value::Json(row.try_get::<sqlx::types::Json<serde_json::Value>, _>(i)?.0)
            }
        };
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_format_as_chrono_would() {
        // A spread of instants from year 0 to 9999, every microsecond digit exercised.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let lo = NaiveDate::from_ymd_opt(0, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("date")
            .and_utc()
            .timestamp_micros();
        let hi = NaiveDate::from_ymd_opt(9999, 12, 31)
            .and_then(|d| d.and_hms_opt(23, 59, 59))
            .expect("date")
            .and_utc()
            .timestamp_micros();
        let span = (hi - lo) as u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let micros = lo + (x % span) as i64;
            let t = DateTime::from_timestamp_micros(micros).expect("in range");
            assert_eq!(
                sqlite_datetime(&t),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
        // Outside four-digit years the slow path keeps chrono's form.
        let far = DateTime::from_timestamp(300_000_000_000, 5_000).expect("in range");
        assert_eq!(
            sqlite_datetime(&far),
            far.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
        );
        // Nanoseconds are cut to microseconds, not rounded.
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_999).expect("in range");
        assert_eq!(sqlite_datetime(&t), "2023-11-14T22:13:20.123456Z");
    }
}
