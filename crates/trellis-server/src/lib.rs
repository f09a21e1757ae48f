//! # trellis-server — the REST API and the `trellis` command line
//!
//! Wires the engines to HTTP: [`app`] builds the whole axum router from a [`state::AppState`], so
//! tests can drive it with or without a socket; [`cli`] is the `trellis` binary's logic.
//! Architecture invariant: this is the only crate that knows about HTTP.

pub mod api;
pub mod appdef;
pub mod auth;
pub mod bench;
pub mod bench_flows;
pub mod bench_reports;
pub mod cli;
pub mod crm;
pub mod demo;
pub mod demo_data;
pub mod error;
pub mod identity;
pub mod limits;
pub mod policy;
pub mod sheets;
pub mod state;
pub mod workflows;
pub mod writer;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Json, Router};
use error::ApiError;
use state::AppState;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

/// Largest request body on most routes.
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// Largest body of a batch import or an app definition.
pub const MAX_BULK_BODY: usize = 64 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "Trellis API", description = "Apps, records, users and teams of a Trellis server. Errors are RFC 9457 problem JSON."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "apps", description = "App definitions and versions"),
          (name = "reports", description = "Metric queries, drill-down and dashboards"),
         (name = "records", description = "Records of an app's entities"),
         (name = "users", description = "Users and teams"),
         (name = "workflows", description = "Workflows, runs, notifications, emails, documents and approvals"),
         (name = "identity", description = "Logging in and personal API tokens"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routers of every `/api/v1` route — those behind the token check and the public ones —
/// and their OpenAPI document.
pub fn api() -> (Router<AppState>, Router<AppState>, utoipa::openapi::OpenApi) {
    let bulk = OpenApiRouter::new()
        .merge(api::apps::router())
        .merge(api::records::bulk_router())
        .layer(DefaultBodyLimit::max(MAX_BULK_BODY));
    let normal = OpenApiRouter::new()
        .merge(api::records::router())
        .merge(api::reports::router())
        .merge(api::workflows::router())
        .merge(api::users::router())
        .merge(api::identity::router())
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let (private, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(bulk)
        .merge(normal)
        .split_for_parts();
    let (public, public_doc) = api::identity::public_router()
        .merge(api::workflows::public_router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .split_for_parts();
    doc.merge(public_doc);
    (private, public, doc)
}

/// The whole application: API, OpenAPI document, health check, problem-JSON fallbacks.
pub fn app(state: AppState) -> Router {
    use axum::http::{header, HeaderValue};
    use tower_http::set_header::SetResponseHeaderLayer as Set;
    let (api_router, public_router, doc) = api();
    let doc = std::sync::Arc::new(doc);
    let api_router = api_router
        .route(
            "/api/v1/openapi.json",
            get(move || async move { Json(doc.as_ref().clone()) }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api_router)
        .merge(public_router)
        .fallback(|| async {
            ApiError::not_found("There is no such route; see /api/v1/openapi.json.")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                "method_not_allowed",
                "This route does not accept this method.",
            )
        })
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_secs(state.http.timeout_seconds),
        ))
        .layer(cors(&state.http.cors_origins))
        // Headers every answer carries: no sniffing, no framing, no caching of API data, no
        // referrer, and a content policy that lets a browser run nothing from an API answer.
        .layer(Set::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(Set::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(Set::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(Set::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(Set::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// CORS: off (no headers) unless origins are configured.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return tower_http::cors::CorsLayer::new();
    }
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::RETRY_AFTER,
            // A report's row count and truncation (files have no `meta`).
            header::HeaderName::from_static("trellis-row-count"),
            header::HeaderName::from_static("trellis-truncated"),
        ])
}

async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sql = trellis_form::db::Sql::new("SELECT 1");
    state
        .db
        .fetch_optional(&sql, &[trellis_form::model::ColKind::Int])
        .await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

/// Serve `state` on `listener` until `shutdown` resolves (used by `trellis serve` and tests).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The workflow worker runs beside the HTTP server and stops with it.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(workflows::run_worker(state.clone(), stopped));
    let out = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop.send(true);
    let _ = worker.await;
    out
}
