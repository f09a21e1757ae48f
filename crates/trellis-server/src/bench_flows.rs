//! `trellis bench flows`: what the workflow engine costs and how fast it reacts, on the CRM with
//! its sample organisation, over a real loopback HTTP server in this process.
//!
//! * **Inline assignment cost**: single lead creates that trigger the inline `new_lead` workflow
//!   (tag, assign by region with round-robin, notify, first-call task), interleaved with creates
//!   that skip it (an explicit owner makes its condition false), same server, same load; the
//!   difference of the p50/p99 latencies is what the inline workflow adds to a create.
//! * **Async first action latency** at a steady rate (default 200 leads/s): from the write's
//!   timestamp to the start of the first step of its `lead_welcome` run (email kept in the outbox,
//!   IM post skipped), p50 and p99, read back from the run log.
//! * **Async throughput**: a batch of leads (one commit per 1,000) and the time until every
//!   `lead_welcome` run has finished: runs per second (each run is two steps).
//! * **Condition cost**: one rhai condition beside the same test as a native Rust closure.

use crate::state::AppState;
use serde_json::{json, Value as Json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_form::db::{Db, Sql, Value};
use trellis_form::model::ColKind;
use trellis_form::{Clock, SystemClock};

/// One line of the report.
#[derive(Debug, serde::Serialize)]
pub struct Line {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
}

fn line(name: &str, value: f64, unit: &'static str) -> Line {
    eprintln!("{name:<58} {value:>10.2} {unit}");
    Line {
        name: name.into(),
        value,
        unit,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Json,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let r = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "create failed: {}",
        r.text().await?
    );
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

async fn finished(db: &Db, since: chrono::DateTime<chrono::Utc>) -> anyhow::Result<(i64, i64)> {
    let mut sql = Sql::new("SELECT COUNT(*), SUM(CASE WHEN \"status\" IN ('succeeded', 'failed') THEN 1 ELSE 0 END) FROM \"flow_runs\" WHERE \"workflow\" = 'lead_welcome' AND \"created_at\" >= ");
    sql.bind(Value::DateTime(since));
    let r = db
        .fetch_optional(&sql, &[ColKind::Int, ColKind::Int])
        .await?
        .unwrap_or_default();
    let n = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => *i,
        _ => 0,
    };
    Ok((n(r.first()), n(r.get(1))))
}

async fn wait_done(
    db: &Db,
    since: chrono::DateTime<chrono::Utc>,
    expected: i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (all, done) = finished(db, since).await?;
        if all >= expected && done >= expected {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs did not finish: {done}/{expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run the benchmark on `db` (an empty database).
pub async fn run(
    db: Db,
    singles: usize,
    rate: usize,
    seconds: usize,
    burst: usize,
) -> anyhow::Result<Vec<Line>> {
    let token = crate::auth::new_token();
    let (state, _): (AppState, _) =
        crate::cli::prepare(db.clone(), Arc::new(SystemClock), None, Some(&token)).await?;
    let state = state.with_http(crate::limits::HttpSettings {
        rate_per_second: 0.0,
        ..Default::default()
    });
    let loaded = state.app("crm").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    crate::demo::install(&db, &loaded.app, state.admin_user, SystemClock.now()).await?;
    let rep = trellis_form::users::by_email(&db, &format!("ma.jun@{}", crate::demo::SAMPLE_DOMAIN))
        .await?
        .map(|u| u.id)
        .ok_or_else(|| anyhow::anyhow!("sample organisation missing"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(crate::serve_until(listener, state, std::future::pending()));
    let url = format!("http://{addr}/api/v1/apps/crm/records/lead");
    let client = reqwest::Client::new();
    let mut lines = vec![];
    // Let the start-up work (idle sample opportunities) drain first.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Inline assignment cost, interleaved with its baseline.
    let (mut with, mut without) = (vec![], vec![]);
    for i in 0..singles {
        let region = ["north", "east", "south", "overseas"][i % 4];
        let body = json!({"name": format!("Inline {i}"), "region": region});
        with.push(post(&client, &url, &token, &body).await?);
        let body = json!({"name": format!("Owned {i}"), "region": "east", "owner": rep});
        without.push(post(&client, &url, &token, &body).await?);
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    lines.push(line(
        "create lead, no inline workflow (baseline) p50",
        pct(&without, 0.5),
        "ms",
    ));
    lines.push(line(
        "create lead, no inline workflow (baseline) p99",
        pct(&without, 0.99),
        "ms",
    ));
    lines.push(line(
        "create lead + inline new_lead workflow p50",
        pct(&with, 0.5),
        "ms",
    ));
    lines.push(line(
        "create lead + inline new_lead workflow p99",
        pct(&with, 0.99),
        "ms",
    ));
    lines.push(line(
        "inline workflow adds at p99",
        pct(&with, 0.99) - pct(&without, 0.99),
        "ms",
    ));

    // 2. Async first-action latency at a steady rate.
    let since = SystemClock.now();
    let n = rate * seconds;
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut sent = vec![];
    for i in 0..n {
        let due = start + every * i as u32;
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        sent.push(tokio::spawn(async move {
            let body = json!({"name": format!("Steady {i}"), "email": format!("steady{i}@bench.example"), "region": "east"});
            post(&client, &url, &token, &body).await
        }));
    }
    for s in sent {
        s.await??;
    }
    let offered = n as f64 / start.elapsed().as_secs_f64();
    wait_done(&db, since, n as i64).await?;
    let mut sql = Sql::new("SELECT e.\"at\", MIN(s.\"started_at\") FROM \"flow_runs\" r JOIN \"events\" e ON e.\"id\" = r.\"event_id\" JOIN \"flow_steps\" s ON s.\"run_id\" = r.\"id\" WHERE r.\"workflow\" = 'lead_welcome' AND r.\"created_at\" >= ");
    sql.bind(Value::DateTime(since))
        .push(" GROUP BY r.\"id\", e.\"at\"");
    let mut lat: Vec<f64> = db
        .fetch_all(&sql, &[ColKind::DateTime, ColKind::DateTime])
        .await?
        .into_iter()
        .filter_map(|r| match (&r[0], &r[1]) {
            (Value::DateTime(a), Value::DateTime(b)) => {
                Some((*b - *a).num_microseconds()? as f64 / 1000.0)
            }
            _ => None,
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    lines.push(line("steady load offered", offered, "leads/s"));
    lines.push(line("async first action latency p50", pct(&lat, 0.5), "ms"));
    lines.push(line(
        "async first action latency p99",
        pct(&lat, 0.99),
        "ms",
    ));

    // 3. Async throughput: a burst through the batch endpoint, then drain. Meanwhile, timers:
    //    records of a second app whose workflow waits 2 s, created during the burst; their
    //    lateness (wake-up minus due time) is read from the run log.
    let timers_def = json!({"key": "timers", "entities": [{"key": "ping", "fields": [{"key": "n", "type": "integer"}]}],
        "workflows": [{"key": "two_seconds", "trigger": {"type": "record_created", "entity": "ping"},
                       "nodes": [{"id": "pause", "type": "wait", "seconds": 2}, {"id": "done", "type": "update_record", "values": {"n": 1}}],
                       "edges": [{"from": "pause", "to": "done"}]}]});
    let r = client
        .post(format!("http://{addr}/api/v1/apps"))
        .bearer_auth(&token)
        .json(&timers_def)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "timers app: {}", r.text().await?);
    let pings = {
        let (client, token) = (client.clone(), token.clone());
        let url = format!("http://{addr}/api/v1/apps/timers/records/ping");
        tokio::spawn(async move {
            for i in 0..200 {
                post(&client, &url, &token, &json!({"n": 0})).await?;
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    let since = SystemClock.now();
    let started = Instant::now();
    let mut i = 0;
    while i < burst {
        let chunk: Vec<Json> = (i..(i + 1000).min(burst))
            .map(|k| json!({"name": format!("Burst {k}"), "email": format!("burst{k}@bench.example"), "region": "south", "owner": rep}))
            .collect();
        let r = client
            .post(format!("{url}/batch"))
            .bearer_auth(&token)
            .json(&json!({"records": chunk}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "batch failed: {}", r.text().await?);
        i += 1000;
    }
    let written = started.elapsed().as_secs_f64();
    let (_, done_when_written) = finished(&db, since).await?;
    wait_done(&db, since, burst as i64).await?;
    let total = started.elapsed().as_secs_f64();
    // With the queue full (every lead written): runs finished per second until it is empty.
    let drain = (burst as i64 - done_when_written) as f64 / (total - written);
    lines.push(line(
        "burst: leads written (batch of 1,000 per commit)",
        burst as f64 / written,
        "leads/s",
    ));
    lines.push(line(
        "burst: async runs finished (2 steps each), end to end",
        burst as f64 / total,
        "runs/s",
    ));
    lines.push(line(
        "burst: async runs finished once every lead was written",
        drain,
        "runs/s",
    ));
    pings.await??;
    // Timer lateness: the wait step logs when it began waiting (`since`) and ended (`ended`).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut late: Vec<f64>;
    loop {
        let sql = Sql::new("SELECT s.\"output\" FROM \"flow_steps\" s JOIN \"flow_runs\" r ON r.\"id\" = s.\"run_id\" WHERE r.\"workflow\" = 'two_seconds' AND s.\"node\" = 'pause' AND s.\"status\" = 'succeeded'");
        late = db
            .fetch_all(&sql, &[ColKind::Json])
            .await?
            .into_iter()
            .filter_map(|r| match &r[0] {
                Value::Json(j) => {
                    let t = |k: &str| {
                        j.get(k)
                            .and_then(Json::as_str)
                            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    };
                    let (since, ended) = (t("since")?, t("ended")?);
                    Some(((ended - since).num_microseconds()? as f64 / 1000.0) - 2000.0)
                }
                _ => None,
            })
            .collect();
        if late.len() >= 200 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    late.sort_by(f64::total_cmp);
    anyhow::ensure!(
        late.first().is_none_or(|x| *x >= 0.0),
        "a timer fired early"
    );
    lines.push(line(
        "timer lateness under the burst p50 (2 s waits)",
        pct(&late, 0.5),
        "ms",
    ));
    lines.push(line(
        "timer lateness under the burst p99",
        pct(&late, 0.99),
        "ms",
    ));

    // 4. One condition: rhai beside a native closure.
    let engine = Arc::new(trellis_flow::script::engine());
    let cond = trellis_flow::script::compile(
        &engine,
        r#"record.region == "east" && record.amount > decimal("100000")"#,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let ctx = json!({"record": {"region": "east", "amount": {"amount": "250000.00", "currency": "CNY"}, "name": "x"}});
    let k = 20_000;
    let t = Instant::now();
    let mut hits = 0;
    for _ in 0..k {
        hits += cond.eval(&ctx).map_err(|e| anyhow::anyhow!(e))? as usize;
    }
    let rhai_us = t.elapsed().as_secs_f64() * 1e6 / k as f64;
    let native = |c: &Json| {
        c.pointer("/record/region").and_then(Json::as_str) == Some("east")
            && c.pointer("/record/amount/amount")
                .and_then(Json::as_str)
                .and_then(|s| s.parse::<rust_decimal::Decimal>().ok())
                .is_some_and(|d| d > rust_decimal::Decimal::from(100_000))
    };
    let t = Instant::now();
    for _ in 0..k {
        hits += std::hint::black_box(native(std::hint::black_box(&ctx))) as usize;
    }
    let native_us = t.elapsed().as_secs_f64() * 1e6 / k as f64;
    anyhow::ensure!(hits == 2 * k, "the condition must hold");
    lines.push(line(
        "one rhai condition (with context conversion)",
        rhai_us,
        "µs",
    ));
    lines.push(line(
        "the same test as a native Rust closure",
        native_us,
        "µs",
    ));
    server.abort();
    Ok(lines)
}
