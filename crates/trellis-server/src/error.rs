//! Every error the API returns, mapped in one place to RFC 9457 problem JSON.
//!
//! Each kind has a stable machine-readable `code` (kept in [`CODES`], listed in
//! `docs/reference/api.md`), an HTTP status and a title. Validation problems carry the JSON pointer
//! of each offending value in `errors`. 5xx bodies are generic: the detail is logged once, here.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use trellis_form::{FormError, Problem};

/// code → (status, title). The one table of API error kinds.
pub const CODES: &[(&str, u16, &str)] = &[
    ("validation_failed", 422, "The input is invalid"),
    ("invalid_definition", 422, "The app definition is invalid"),
    ("invalid_query", 400, "The query is invalid"),
    ("invalid_header", 400, "A request header is invalid"),
    ("malformed_json", 400, "The request body is not valid JSON"),
    ("invalid_body", 422, "The request body has the wrong shape"),
    (
        "unsupported_media_type",
        415,
        "Send JSON with Content-Type: application/json",
    ),
    ("payload_too_large", 413, "The request body is too large"),
    ("unauthorized", 401, "A valid bearer token is required"),
    (
        "invalid_signature",
        401,
        "The webhook signature is missing or wrong",
    ),
    ("forbidden", 403, "Not allowed for this token or role"),
    (
        "too_many_requests",
        429,
        "Too many attempts; try again later",
    ),
    ("not_found", 404, "Not found"),
    ("method_not_allowed", 405, "Method not allowed"),
    (
        "version_conflict",
        409,
        "The record was changed by someone else",
    ),
    ("conflict", 409, "The write conflicts with existing data"),
    ("destructive_change", 409, "The change would destroy data"),
    (
        "migration_conflict",
        409,
        "The change does not fit the existing data",
    ),
    ("internal", 500, "Internal server error"),
];

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    code: &'static str,
    detail: String,
    errors: Vec<Problem>,
    extra: Option<Box<(&'static str, serde_json::Value)>>,
    retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    ty: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [Problem],
}

impl ApiError {
    /// An error of `code` with a detail sentence.
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        debug_assert!(
            CODES.iter().any(|(c, ..)| *c == code),
            "unknown code {code}"
        );
        ApiError {
            code,
            detail: detail.into(),
            errors: vec![],
            extra: None,
            retry_after: None,
        }
    }

    /// With a list of located problems.
    pub fn with_errors(mut self, errors: Vec<Problem>) -> Self {
        self.errors = errors;
        self
    }

    /// Tell the client when to try again (429).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The status of this error.
    pub fn status(&self) -> StatusCode {
        let s = CODES
            .iter()
            .find(|(c, ..)| *c == self.code)
            .map(|(_, s, _)| *s)
            .unwrap_or(500);
        StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The problem JSON body of this error (for errors reported inside a larger answer).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "status": self.status().as_u16(),
            "code": self.code,
            "detail": self.detail,
            "errors": self.errors,
        })
    }

    /// 404 for a missing thing.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new("not_found", what)
    }

    /// 401.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        ApiError::new("unauthorized", detail)
    }

    /// 500, logged once; the body stays generic.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::new(
            "internal",
            "Something went wrong on the server; it has been logged.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let title = CODES
            .iter()
            .find(|(c, ..)| *c == self.code)
            .map(|(.., t)| *t)
            .unwrap_or("Error");
        let mut body = serde_json::to_value(ProblemBody {
            ty: format!("urn:trellis:problem:{}", self.code),
            title,
            status: status.as_u16(),
            code: self.code,
            detail: &self.detail,
            errors: &self.errors,
        })
        .unwrap_or_default();
        if let Some((k, v)) = self.extra.map(|b| *b) {
            body[k] = v;
        }
        let mut resp = (status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<FormError> for ApiError {
    fn from(e: FormError) -> Self {
        let detail = e.to_string();
        match e {
            FormError::Invalid(p) => ApiError::new("validation_failed", detail).with_errors(p),
            FormError::Definition(p) => ApiError::new("invalid_definition", detail).with_errors(p),
            FormError::Query(p) => ApiError::new("invalid_query", detail).with_errors(p),
            FormError::Destructive(p) => ApiError::new("destructive_change", detail).with_errors(p),
            FormError::MigrationConflict(p) => {
                ApiError::new("migration_conflict", detail).with_errors(p)
            }
            FormError::Conflict(p) => ApiError::new("conflict", detail).with_errors(p),
            FormError::AppNotFound(_)
            | FormError::EntityNotFound(_)
            | FormError::RecordNotFound
            | FormError::NotFound(_) => ApiError::not_found(detail),
            FormError::VersionConflict { current, .. } => {
                let mut err = ApiError::new("version_conflict", detail);
                err.extra = Some(Box::new(("current_version", serde_json::json!(current))));
                err
            }
            FormError::Internal(e) => ApiError::internal(e),
            FormError::Database(e) => ApiError::internal(e),
            FormError::Migrate(e) => ApiError::internal(e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonSyntaxError(e) => ApiError::new(
                "malformed_json",
                format!("The body is not valid JSON: {}", source_text(&e)),
            ),
            JsonRejection::JsonDataError(e) => ApiError::new(
                "invalid_body",
                format!("The body has the wrong shape: {}", source_text(&e)),
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                "unsupported_media_type",
                "Send the body as JSON with the header Content-Type: application/json.",
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(
                    "payload_too_large",
                    "The request body is larger than this endpoint accepts.",
                )
            }
            other => ApiError::new("malformed_json", other.body_text()),
        }
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

/// Result alias of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
