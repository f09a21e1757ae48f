//! `TestApp`: a server on a random loopback port over a fresh database.

use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use std::sync::Arc;
use trellis_form::testing::{self, TestDb};

pub const TOKEN: &str = "test-admin-token";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub backend: &'static str,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    /// Start a server with the CRM app on `db`. It is listening when this returns.
    pub async fn start(db: TestDb) -> TestApp {
        TestApp::start_with(db, trellis_server::limits::HttpSettings::default()).await
    }

    /// Start with other HTTP settings (rate limit, CORS, timeout).
    pub async fn start_with(db: TestDb, http: trellis_server::limits::HttpSettings) -> TestApp {
        TestApp::start_full(
            db,
            http,
            trellis_flow::Settings::default(),
            Arc::new(trellis_form::SystemClock),
        )
        .await
    }

    /// Start with workflow settings (SMTP sink, outbound allow-list, variables) and a clock.
    pub async fn start_full(
        db: TestDb,
        http: trellis_server::limits::HttpSettings,
        flow: trellis_flow::Settings,
        clock: Arc<dyn trellis_form::Clock>,
    ) -> TestApp {
        let (state, _) =
            trellis_server::cli::prepare_with(db.db.clone(), clock, None, Some(TOKEN), flow)
                .await
                .expect("prepare");
        let state = state.with_http(http);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum_serve(listener, state, rx).await;
        });
        TestApp {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            backend: db.backend,
            db,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// One server per backend.
    pub async fn each() -> Vec<TestApp> {
        let mut v = vec![];
        for db in testing::each().await {
            v.push(TestApp::start(db).await);
        }
        v
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An authenticated request.
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(TOKEN)
    }

    /// Send JSON, get status and JSON back.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        json(r.send().await.expect("request")).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.db.cleanup().await;
    }
}

async fn axum_serve(
    listener: tokio::net::TcpListener,
    state: trellis_server::state::AppState,
    rx: tokio::sync::oneshot::Receiver<()>,
) {
    trellis_server::serve_until(listener, state, async {
        let _ = rx.await;
    })
    .await
    .expect("server");
}

/// Status and JSON body (Null when the body is empty).
pub async fn json(r: Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// The (path, code) pairs of a problem body.
#[track_caller]
pub fn problem_paths(body: &Value) -> Vec<(String, String)> {
    body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {body}"))
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_owned(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A request with another token than the admin's.
pub async fn with(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    json(r.send().await.unwrap()).await
}
