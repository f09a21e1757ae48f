//! The workflow worker of a server process, and its settings from the environment.
//!
//! One task per process: it turns new events into runs, advances due runs, rescues runs whose
//! worker lost its lease, and looks for idle records (inactivity triggers). It wakes as soon as a
//! write commits (the write paths notify it) and at least every 200 ms, so timers fire late by at
//! most that, never early. Several processes on one PostgreSQL database share the work through
//! leases.

use crate::state::AppState;
use std::time::{Duration, Instant};
use trellis_flow::netguard::AllowList;
use trellis_flow::{Settings, Smtp, SmtpTls};

/// Settings from `TRELLIS_SMTP_HOST` / `TRELLIS_SMTP_PORT` / `TRELLIS_SMTP_FROM` /
/// `TRELLIS_SMTP_TLS` (`none`, `starttls`, `tls`; by default STARTTLS on 587, TLS on 465, plain
/// otherwise) / `TRELLIS_SMTP_USER` / `TRELLIS_SMTP_PASSWORD`,
/// `TRELLIS_OUTBOUND_ALLOW`, `TRELLIS_FLOW_MAX_DEPTH` and every `TRELLIS_VAR_<NAME>` (a template
/// variable `vars.<NAME>`).
pub fn settings_from_env() -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    if let Ok(host) = std::env::var("TRELLIS_SMTP_HOST") {
        if !host.is_empty() {
            let port = match std::env::var("TRELLIS_SMTP_PORT") {
                Ok(p) if !p.is_empty() => p
                    .parse()
                    .map_err(|_| anyhow::anyhow!("TRELLIS_SMTP_PORT `{p}` is not a port"))?,
                _ => 25,
            };
            let from =
                std::env::var("TRELLIS_SMTP_FROM").unwrap_or_else(|_| "trellis@localhost".into());
            let tls = match std::env::var("TRELLIS_SMTP_TLS").ok().as_deref() {
                Some("none") => SmtpTls::None,
                Some("starttls") => SmtpTls::StartTls,
                Some("tls") => SmtpTls::Tls,
                None | Some("") => match port {
                    587 => SmtpTls::StartTls,
                    465 => SmtpTls::Tls,
                    _ => SmtpTls::None,
                },
                Some(other) => {
                    anyhow::bail!("TRELLIS_SMTP_TLS `{other}` is not one of none, starttls, tls")
                }
            };
            let credentials = match (
                std::env::var("TRELLIS_SMTP_USER"),
                std::env::var("TRELLIS_SMTP_PASSWORD"),
            ) {
                (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
                _ => None,
            };
            s.smtp = Some(Smtp {
                host,
                port,
                from,
                tls,
                credentials,
            });
        }
    }
    if let Ok(a) = std::env::var("TRELLIS_OUTBOUND_ALLOW") {
        s.allow =
            AllowList::parse(&a).map_err(|e| anyhow::anyhow!("TRELLIS_OUTBOUND_ALLOW: {e}"))?;
    }
    if let Ok(d) = std::env::var("TRELLIS_FLOW_MAX_DEPTH") {
        s.max_depth = d
            .parse()
            .map_err(|_| anyhow::anyhow!("TRELLIS_FLOW_MAX_DEPTH `{d}` is not a number"))?;
    }
    for (k, v) in std::env::vars() {
        if let Some(name) = k.strip_prefix("TRELLIS_VAR_") {
            s.vars.insert(name.to_owned(), v);
        }
    }
    Ok(s)
}

/// Work until `stop` turns true: one task turns events into runs, another advances runs, so a
/// long batch of runs never delays the dispatch of new events.
pub async fn run_worker(state: AppState, stop: tokio::sync::watch::Receiver<bool>) {
    let flows = state.flows.clone();
    let dispatcher = {
        let flows = flows.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                let busy = match flows.dispatch(500).await {
                    Ok(n) => n > 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot dispatch workflow events");
                        false
                    }
                };
                if busy {
                    continue;
                }
                tokio::select! {
                    _ = flows.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    };
    let mut stop = stop;
    let mut last_rescue = Instant::now() - Duration::from_secs(60);
    let mut last_scan = Instant::now() - Duration::from_secs(60);
    let mut last_cron = Instant::now() - Duration::from_secs(60);
    loop {
        if *stop.borrow() {
            break;
        }
        // Schedules are checked every second: a cron moment fires within about a second.
        if last_cron.elapsed() >= Duration::from_secs(1).min(flows.settings().scan_every) {
            last_cron = Instant::now();
            if let Err(e) = flows.scan_schedules().await {
                tracing::warn!(error = %e, "cannot check workflow schedules");
            }
        }
        let busy = match flows.work().await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim workflow runs");
                false
            }
        };
        if last_rescue.elapsed() > Duration::from_secs(5) {
            last_rescue = Instant::now();
            match flows.rescue().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    runs = n,
                    "rescued workflow runs whose worker lost its lease"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot rescue workflow runs"),
            }
        }
        if last_scan.elapsed() >= flows.settings().scan_every {
            last_scan = Instant::now();
            if let Err(e) = flows.scan_inactivity().await {
                tracing::warn!(error = %e, "cannot scan for idle records");
            }
            if let Err(e) = flows.scan_dates().await {
                tracing::warn!(error = %e, "cannot scan for date triggers");
            }
        }
        if busy {
            continue;
        }
        tokio::select! {
            _ = flows.work_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
    let _ = dispatcher.await;
}
