//! The REST API under `/api/v1`, one module per resource, each with its own `router()`.
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document is generated from the
//! same annotations that build the router and cannot drift from it.

pub mod apps;
pub mod identity;
pub mod records;
pub mod reports;
pub mod users;
pub mod workflows;

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// A JSON body whose rejections become problem JSON.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiError::from(r)),
        }
    }
}

/// Query-string parameters whose rejections become problem JSON.
#[derive(Debug)]
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Q(v)),
            Err(r) => Err(ApiError::new(
                "invalid_query",
                format!("The query string is invalid: {}", r.body_text()),
            )),
        }
    }
}

/// A path parameter that must be a UUID; anything else is a 404 (no such record).
pub fn parse_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| ApiError::not_found(format!("no record has the id `{id}`")))
}

/// Shape of a problem response, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ProblemDoc {
    /// `urn:trellis:problem:<code>`.
    #[schema(rename = "type")]
    ty: String,
    /// Short title of the kind.
    title: String,
    /// HTTP status.
    status: u16,
    /// Stable machine-readable code.
    code: String,
    /// What happened.
    detail: String,
    /// Located problems.
    errors: Option<Vec<ProblemItemDoc>>,
}

/// One located problem, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ProblemItemDoc {
    /// JSON pointer into the request.
    path: String,
    /// Stable code.
    code: String,
    /// A sentence a business user understands.
    message: String,
}
