//! Spreadsheet files in and out: CSV (csv crate) and XLSX (calamine to read, rust_xlsxwriter to
//! write). The mapping of cells onto fields lives in `trellis_form::sheet`; this module reads and
//! writes files and runs an import as one all-or-nothing transaction.

use anyhow::{bail, Context};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use trellis_form::db::{quote, Db, Sql, Value};
use trellis_form::model::{App, ColKind, Entity};
use trellis_form::query::{Filter, ListQuery};
use trellis_form::sheet::{self, Cell, CellProblem, Lookups};
use trellis_form::store::{self, WriteCtx};
use trellis_form::FormError;

/// The first sheet of a file: its header row, its data rows, and the sheet row number of the
/// header (1 unless an XLSX sheet starts lower), so problems name the rows a person sees.
#[derive(Debug, Clone)]
pub struct Sheet {
    /// Header cells, as text.
    pub headers: Vec<String>,
    /// Data rows.
    pub rows: Vec<Vec<Cell>>,
    /// Sheet row number of the header.
    pub header_row: usize,
}

/// Read a `.csv` or `.xlsx` (also `.xls`, `.ods`) file.
pub fn read(path: &Path) -> anyhow::Result<Sheet> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_lowercase();
    match ext.as_str() {
        "csv" | "txt" => read_csv(path),
        "xlsx" | "xlsm" | "xls" | "ods" => read_workbook(path),
        "" => bail!(
            "cannot tell the format of {}: name it .csv or .xlsx",
            path.display()
        ),
        other => bail!("cannot read `.{other}` files: use .csv (or .txt) or .xlsx (or .xls, .ods)"),
    }
}

fn read_csv(path: &Path) -> anyhow::Result<Sheet> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let headers = r
        .headers()
        .context("cannot read the header row")?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_owned())
        .collect();
    let mut rows = vec![];
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("row {}: not valid CSV", i + 2))?;
        rows.push(
            rec.iter()
                .map(|c| {
                    if c.trim().is_empty() {
                        Cell::Empty
                    } else {
                        Cell::Text(c.to_owned())
                    }
                })
                .collect(),
        );
    }
    Ok(Sheet {
        headers,
        rows,
        header_row: 1,
    })
}

fn read_workbook(path: &Path) -> anyhow::Result<Sheet> {
    use calamine::{Data, Reader};
    let mut wb = calamine::open_workbook_auto(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let range = wb
        .worksheet_range_at(0)
        .context("the workbook has no sheet")?
        .context("cannot read the first sheet")?;
    let mut rows = range.rows();
    let cell = |d: &Data| match d {
        Data::Empty => Cell::Empty,
        Data::String(s) => Cell::Text(s.clone()),
        Data::Int(i) => Cell::Number(*i as f64),
        Data::Float(f) => Cell::Number(*f),
        Data::Bool(b) => Cell::Bool(*b),
        Data::DateTime(t) => t
            .as_datetime()
            .map(Cell::DateTime)
            .unwrap_or(Cell::Number(t.as_f64())),
        Data::DateTimeIso(s) | Data::DurationIso(s) => Cell::Text(s.clone()),
        Data::Error(e) => Cell::Text(format!("#{e:?}")),
    };
    // The range starts at the first non-empty cell: pad columns so letters match the sheet, and
    // remember the header's row number so problems name the rows a person sees.
    let (top, left) = range
        .start()
        .map(|(r, c)| (r as usize, c as usize))
        .unwrap_or((0, 0));
    let pad = |mut v: Vec<Cell>| {
        let mut out = vec![Cell::Empty; left];
        out.append(&mut v);
        out
    };
    let headers = pad(rows
        .next()
        .map(|r| r.iter().map(cell).collect())
        .unwrap_or_default())
    .iter()
    .map(Cell::text)
    .collect();
    let data = rows.map(|r| pad(r.iter().map(cell).collect())).collect();
    Ok(Sheet {
        headers,
        rows: data,
        header_row: top + 1,
    })
}

/// Users by email and related records by their first unique text field, for cells that name them.
pub async fn lookups(db: &Db, app: &App, e: &Entity) -> anyhow::Result<Lookups> {
    let mut l = Lookups::default();
    for u in trellis_form::users::list(db).await? {
        l.users.insert(u.email.to_lowercase(), u.id);
    }
    for f in e
        .fields
        .iter()
        .filter(|f| f.ty == trellis_form::def::FieldType::Relation)
    {
        let target = app.entity(f.def.entity.as_deref().unwrap_or_default())?;
        let Some(key) = target
            .fields
            .iter()
            .find(|t| t.def.unique && t.col_kind() == ColKind::Text)
        else {
            continue;
        };
        let sql = Sql::new(format!(
            "SELECT \"id\", {} FROM {}",
            quote(&key.key),
            quote(&target.table)
        ));
        let mut m = HashMap::new();
        for row in db.fetch_all(&sql, &[ColKind::Uuid, ColKind::Text]).await? {
            if let (Value::Uuid(id), Value::Text(v)) = (&row[0], &row[1]) {
                // Two records whose names differ only in case are ambiguous: the nil id marks
                // the name so a cell naming it is refused rather than linked to either.
                m.entry(v.trim().to_lowercase())
                    .and_modify(|x| *x = uuid::Uuid::nil())
                    .or_insert(*id);
            }
        }
        l.relations.insert(f.key.clone(), m);
    }
    Ok(l)
}

/// What an import did.
#[derive(Debug)]
pub enum Outcome {
    /// Every row was valid; `written` tells whether they were committed (false on a dry run).
    Ok { records: usize, written: bool },
    /// Nothing was written; every bad cell.
    Refused(Vec<CellProblem>),
}

/// How an import runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run<'a> {
    /// Check everything (inline workflows included), then roll back.
    pub dry_run: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The workflow runtime with the app installed: each created record runs its inline
    /// workflows in the import's transaction, as a create through the API does. `None` runs
    /// none (the records' events still wait in the outbox for the async workflows).
    pub flows: Option<&'a trellis_flow::Runtime>,
}

/// Import a sheet into `e`, all or nothing, with the same validation as the API.
pub async fn import(
    db: &Db,
    app: &Arc<App>,
    e: &Entity,
    sheet: &Sheet,
    ctx: &WriteCtx,
    run: Run<'_>,
) -> anyhow::Result<Outcome> {
    let Run {
        dry_run,
        progress,
        flows,
    } = run;
    let flows = flows.filter(|f| crate::writer::has_inline(f, &app.key, &e.key));
    let tz: chrono_tz::Tz = app.def.timezone.parse().unwrap_or(chrono_tz::UTC);
    let l = lookups(db, app, e).await?;
    let mut mapped = sheet::map(e, &sheet.headers, &sheet.rows, sheet.header_row, tz, &l);
    let mut problems = mapped.problems.clone();
    let seen = |problems: &[CellProblem], p: &CellProblem| {
        problems
            .iter()
            .any(|q| q.row == p.row && q.column == p.column && !q.column.is_empty())
    };
    let count = mapped.records.len();
    let mut records = std::mem::take(&mut mapped.records).into_iter();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(count as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} {eta}")
                .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut tx = db.begin().await?;
    // Chunks of a batch's size, each drafted and written side by side
    // (`store::create_batch_pipelined`); each chunk's problems map back to its rows. After a
    // refused chunk the others are still checked, so that every bad cell is listed; the
    // transaction is then rolled back.
    let mut start = 0;
    loop {
        let chunk: Vec<Json> = records.by_ref().take(store::MAX_BATCH).collect();
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        match store::create_batch_pipelined(&mut tx, app.clone(), &e.key, chunk, ctx).await {
            Ok(ids) => {
                // Inline workflows, record by record, as for a create through the API. The first
                // that fails ends the import (a failed step may leave the transaction unusable
                // on PostgreSQL); everything is rolled back.
                if let Some(flows) = flows.filter(|_| problems.is_empty()) {
                    for (k, id) in ids.iter().enumerate() {
                        let r = store::get_in(&mut tx, e, *id).await?;
                        if let Err(err) = flows
                            .inline_created(&mut tx, &app.key, &e.key, &r, ctx.actor)
                            .await
                        {
                            let p =
                                trellis_form::Problem::new("", "workflow_failed", err.to_string());
                            let mut cp = mapped.locate(e, start + k, &p);
                            cp.header = format!("workflow {}", err.workflow);
                            problems.push(cp);
                            break;
                        }
                    }
                    if !problems.is_empty() {
                        break;
                    }
                }
            }
            Err(FormError::Invalid(ps) | FormError::Conflict(ps)) => {
                for p in ps {
                    // `/records/<k>/field…` → the k-th record of this chunk.
                    let rest = p.path.trim_start_matches("/records/");
                    let (k, tail) = rest
                        .split_once('/')
                        .map(|(k, t)| (k, format!("/{t}")))
                        .unwrap_or((rest, String::new()));
                    let i = start + k.parse::<usize>().unwrap_or(0);
                    let p = trellis_form::Problem { path: tail, ..p };
                    let cp = mapped.locate(e, i, &p);
                    // A cell that could not be read is reported once, not again as "required".
                    if !seen(&problems, &cp) {
                        problems.push(cp);
                    }
                }
            }
            Err(other) => return Err(other.into()),
        }
        start += n;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if !problems.is_empty() {
        problems.sort_by(|a, b| (a.row, &a.column).cmp(&(b.row, &b.column)));
        return Ok(Outcome::Refused(problems));
    }
    if dry_run {
        return Ok(Outcome::Ok {
            records: count,
            written: false,
        });
    }
    tx.commit().await?;
    Ok(Outcome::Ok {
        records: count,
        written: true,
    })
}

/// Output formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values, UTF-8.
    Csv,
    /// An Excel workbook.
    Xlsx,
}

/// Every record of `e` matching `filters`, as a header row and text rows: `id`, `owner` (email),
/// `created_at`, then each field (money as amount plus a `<field>__currency` column).
pub async fn table(
    db: &Db,
    e: &Entity,
    filters: Vec<Filter>,
) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let emails: HashMap<uuid::Uuid, String> = trellis_form::users::list(db)
        .await?
        .into_iter()
        .map(|u| (u.id, u.email))
        .collect();
    let mut headers = vec!["id".to_owned(), "owner".to_owned(), "created_at".to_owned()];
    for f in &e.fields {
        headers.push(f.key.clone());
        if f.ty == trellis_form::def::FieldType::Money {
            headers.push(trellis_form::model::currency_column(&f.key));
        }
    }
    let mut rows = vec![];
    let mut cursor = None;
    loop {
        let q = ListQuery {
            filters: filters.clone(),
            limit: Some(1000),
            cursor,
            ..Default::default()
        };
        let page = trellis_form::query::list(db, e, &q).await?;
        for r in &page.records {
            let owner = r
                .meta
                .owner
                .map(|o| emails.get(&o).cloned().unwrap_or_else(|| o.to_string()))
                .unwrap_or_default();
            let mut row = vec![
                r.meta.id.to_string(),
                owner,
                r.meta
                    .created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ];
            for f in &e.fields {
                let v = r.fields.get(&f.key).unwrap_or(&Json::Null);
                // Users by email, like the owner column, so a sheet reads the same in any database.
                match (f.ty, v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok())) {
                    (trellis_form::def::FieldType::User, Some(id)) => {
                        row.push(emails.get(&id).cloned().unwrap_or_else(|| id.to_string()))
                    }
                    _ => row.push(sheet::cell_text(f, v)),
                }
                if f.ty == trellis_form::def::FieldType::Money {
                    row.push(
                        v.get("currency")
                            .and_then(Json::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
            rows.push(row);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok((headers, rows))
}

/// Write a table as CSV to `out`.
pub fn write_csv(
    out: impl std::io::Write,
    headers: &[String],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(headers)?;
    for r in rows {
        w.write_record(r)?;
    }
    w.flush()?;
    Ok(())
}

/// Write a table as an XLSX workbook at `path` (every cell text, as exported records are).
pub fn write_xlsx(path: &Path, headers: &[String], rows: &[Vec<String>]) -> anyhow::Result<()> {
    workbook(headers, rows, false)?.save(path)?;
    Ok(())
}

/// A one-sheet workbook; with `numbers`, cells that parse as numbers are written as numbers.
fn workbook(
    headers: &[String],
    rows: &[Vec<String>],
    numbers: bool,
) -> anyhow::Result<rust_xlsxwriter::Workbook> {
    let mut wb = rust_xlsxwriter::Workbook::new();
    let ws = wb.add_worksheet();
    for (c, h) in headers.iter().enumerate() {
        ws.write_string(0, c as u16, h)?;
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            match v.parse::<f64>() {
                Ok(n) if numbers => ws.write_number(r as u32 + 1, c as u16, n)?,
                _ => ws.write_string(r as u32 + 1, c as u16, v)?,
            };
        }
    }
    Ok(wb)
}

/// A report table as the bytes of an XLSX workbook; numbers stay numbers, so the sheet can sum
/// them.
pub fn xlsx_bytes(headers: &[String], rows: &[Vec<String>]) -> anyhow::Result<Vec<u8>> {
    Ok(workbook(headers, rows, true)?.save_to_buffer()?)
}
