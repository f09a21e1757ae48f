//! Group commit for single creates on SQLite.
//!
//! SQLite has one writer at a time, so concurrent creates queue for the write connection. Rather
//! than weaken durability, one task takes every create that is waiting, checks each in one
//! transaction, writes them with multi-row statements and commits once: each caller still gets
//! its own answer (its record, or its own validation problems), and an acknowledged create is as
//! durable as before. If the shared write fails (two creates in the group claim the same unique
//! value), the group is rolled back and each create is retried alone, so one bad create never
//! fails another. PostgreSQL has real concurrent writers and does not use this path.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use trellis_form::db::Db;
use trellis_form::model::App;
use trellis_form::store::{self, Draft, Record, WriteCtx};
use trellis_form::{FormError, Result};

/// Most creates one commit takes.
pub const MAX_GROUP: usize = 256;

struct Job {
    app: Arc<App>,
    entity: String,
    draft: Draft,
    ctx: WriteCtx,
    reply: oneshot::Sender<Result<Record>>,
}

/// A handle to the group-commit task.
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

/// Run the inline workflows of a just-created record in its transaction; a failing workflow
/// fails the write (its problem names the workflow and node).
pub async fn inline(
    flows: &trellis_flow::Runtime,
    tx: &mut trellis_form::db::Tx,
    app: &App,
    entity: &str,
    record: Record,
) -> Result<Record> {
    let ran = flows
        .inline_created(tx, &app.key, entity, &record, record.meta.created_by)
        .await;
    Ok(refused(ran)?.unwrap_or(record))
}

/// Whether `app` has an enabled inline workflow triggered by `entity`'s records (batch writes
/// read each record back for them only then).
pub fn has_inline(flows: &trellis_flow::Runtime, app: &str, entity: &str) -> bool {
    flows.flows(app).is_some_and(|f| {
        f.enabled().iter().any(|w| {
            w.def.mode == trellis_flow::def::Mode::Inline && w.def.trigger.entity() == entity
        })
    })
}

/// The inline workflows of an update or delete made at `at` in `tx`.
pub async fn inline_written(
    flows: &trellis_flow::Runtime,
    tx: &mut trellis_form::db::Tx,
    app: &App,
    entity: &str,
    id: uuid::Uuid,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Record>> {
    refused(flows.inline(tx, &app.key, entity, id, at).await)
}

fn refused(
    ran: std::result::Result<Option<Record>, trellis_flow::runner::InlineError>,
) -> Result<Option<Record>> {
    ran.map_err(|e| workflow_failed("", &e))
}

/// The write is refused because an inline workflow failed: one problem at `path`.
pub fn workflow_failed(
    path: impl Into<String>,
    e: &trellis_flow::runner::InlineError,
) -> FormError {
    FormError::Invalid(vec![trellis_form::error::Problem::new(
        path,
        "workflow_failed",
        e.to_string(),
    )])
}

impl Writer {
    /// Start the task on `db`.
    pub fn spawn(db: Db, flows: Arc<trellis_flow::Runtime>) -> Writer {
        let (jobs, rx) = mpsc::channel(4 * MAX_GROUP);
        tokio::spawn(run(db, flows, rx));
        Writer { jobs }
    }

    /// Create a record through the group commit; returns when its group has committed.
    pub async fn create(
        &self,
        app: Arc<App>,
        entity: &str,
        draft: Draft,
        ctx: WriteCtx,
    ) -> Result<Record> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            app,
            entity: entity.to_owned(),
            draft,
            ctx,
            reply,
        };
        if self.jobs.send(job).await.is_err() {
            return Err(FormError::Database(sqlx::Error::PoolClosed));
        }
        answer
            .await
            .unwrap_or(Err(FormError::Database(sqlx::Error::PoolClosed)))
    }
}

async fn run(db: Db, flows: Arc<trellis_flow::Runtime>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if jobs.len() == 1 {
            let j = jobs.pop().expect("one job");
            let out = alone(&db, &flows, &j).await;
            let _ = j.reply.send(out);
            flows.wake.notify_one();
            continue;
        }
        let grouped = group(&db, &flows, &mut jobs).await;
        flows.wake.notify_one();
        if let Err(e) = grouped {
            tracing::debug!(error = %e, size = jobs.len(), "group commit failed; retrying its creates one by one");
            for j in jobs.drain(..) {
                let out = alone(&db, &flows, &j).await;
                let _ = j.reply.send(out);
            }
            flows.wake.notify_one();
        }
    }
}

/// One create in its own transaction.
async fn alone(db: &Db, flows: &trellis_flow::Runtime, j: &Job) -> Result<Record> {
    let e = j.app.entity(&j.entity)?;
    let mut tx = db.begin().await?;
    let r = store::insert(&mut tx, &j.app, e, j.draft.clone(), &j.ctx).await?;
    let r = inline(flows, &mut tx, &j.app, &j.entity, r).await?;
    tx.commit().await?;
    Ok(r)
}

/// Check every job in one transaction, answer the invalid ones at once, write the rest together.
/// On success every job in `jobs` has been answered and `jobs` is empty; on error the jobs left
/// in `jobs` have not been answered (and nothing was committed).
async fn group(db: &Db, flows: &trellis_flow::Runtime, jobs: &mut Vec<Job>) -> Result<()> {
    let mut tx = db.begin().await?;
    let mut ready: Vec<(Job, store::NewRow)> = vec![];
    let mut pending = std::mem::take(jobs).into_iter();
    while let Some(j) = pending.next() {
        let e = match j.app.entity(&j.entity) {
            Ok(e) => e,
            Err(err) => {
                let _ = j.reply.send(Err(err));
                continue;
            }
        };
        match store::prepare_row(&mut tx, &j.app, e, j.draft.clone(), &j.ctx).await {
            Ok(row) => ready.push((j, row)),
            Err(err @ FormError::Invalid(_)) => {
                let _ = j.reply.send(Err(err));
            }
            Err(err) => {
                // Every job not answered yet goes back for one-by-one retries.
                jobs.push(j);
                jobs.extend(ready.into_iter().map(|(j, _)| j));
                jobs.extend(pending);
                return Err(err);
            }
        }
    }
    // One multi-row write per app, entity and actor.
    let mut groups: HashMap<(String, String, Option<uuid::Uuid>), Vec<usize>> = HashMap::new();
    for (i, (j, _)) in ready.iter().enumerate() {
        groups
            .entry((j.app.key.clone(), j.entity.clone(), j.ctx.actor))
            .or_default()
            .push(i);
    }
    let records: Vec<Record> = ready.iter().map(|(_, r)| r.record().clone()).collect();
    let mut rows: Vec<Option<store::NewRow>> = Vec::with_capacity(ready.len());
    let mut owners: Vec<Job> = Vec::with_capacity(ready.len());
    for (j, r) in ready {
        rows.push(Some(r));
        owners.push(j);
    }
    for idx in groups.values() {
        let first = &owners[idx[0]];
        let e = match first.app.entity(&first.entity) {
            Ok(e) => e,
            Err(err) => {
                jobs.extend(owners);
                return Err(err);
            }
        };
        let batch: Vec<store::NewRow> = idx.iter().filter_map(|i| rows[*i].take()).collect();
        if let Err(err) = store::write_new_rows(&mut tx, &first.app, e, batch, &first.ctx).await {
            jobs.extend(owners);
            return Err(err);
        }
    }
    // Inline workflows of every create, in the shared transaction; one failure sends the whole
    // group back to be retried one by one, so only its own create fails.
    let mut records = records;
    for (j, r) in owners.iter().zip(records.iter_mut()) {
        match inline(flows, &mut tx, &j.app, &j.entity, r.clone()).await {
            Ok(done) => *r = done,
            Err(err) => {
                jobs.extend(owners);
                return Err(err);
            }
        }
    }
    if let Err(err) = tx.commit().await {
        jobs.extend(owners);
        return Err(err);
    }
    for (j, r) in owners.into_iter().zip(records) {
        let _ = j.reply.send(Ok(r));
    }
    Ok(())
}
