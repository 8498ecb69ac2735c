//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with
//! the HTTP status that matches each [`RequestError`] (as the gRPC front maps them to
//! codes). Field names of the shared validation are reported as the OpenAI parameters
//! they came from.
use crate::error::RequestError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A request's failure, answered as OpenAI answers it.
#[derive(Debug)]
pub struct ApiError(pub RequestError);

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        Self(e)
    }
}

/// The OpenAI parameter a validated request field came from.
fn openai_param(field: &str) -> &str {
    match field {
        "max_new_tokens" => "max_tokens",
        "sampling.temperature" => "temperature",
        "sampling.top_p" => "top_p",
        "sampling.seed" => "seed",
        "prompt_token_ids" => "prompt",
        "adapter" => "model",
        other => other,
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The body: `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = match &self.0 {
            RequestError::InvalidArgument { .. } | RequestError::FailedPrecondition(_) => {
                ("invalid_request_error", None)
            }
            RequestError::NotFound(_) => ("invalid_request_error", Some("model_not_found")),
            RequestError::PermissionDenied(_) => ("permission_error", None),
            RequestError::Aborted(_) => ("conflict_error", None),
            RequestError::ResourceExhausted(_) | RequestError::Overloaded { .. } => {
                ("rate_limit_error", None)
            }
            RequestError::Unauthenticated(_) => ("authentication_error", Some("invalid_api_key")),
            RequestError::DeadlineExceeded(_) => ("timeout_error", None),
            RequestError::Unavailable(_) | RequestError::Internal(_) => ("server_error", None),
        };
        let (message, param) = match &self.0 {
            RequestError::InvalidArgument { field, message } => {
                let param = openai_param(field);
                (format!("{param}: {message}"), Some(param.to_string()))
            }
            other => (other.to_string(), None),
        };
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Some(ms) = self.0.retry_after_ms() {
            // Retry-After counts whole seconds: round up, so a retry is never early.
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if matches!(self.0, RequestError::Unauthenticated(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
