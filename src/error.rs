//! The one error every request and admin call can fail with, from validation, the adapter
//! registry and the engine to the client, and its one mapping to gRPC status codes
//! ([`RequestError::code`]). Messages speak the API's language: an invalid argument names
//! the request field, and no message names a command-line flag (budgets are described,
//! with their sizes).
use tonic::{Code, Status};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The request is malformed; `field` is the proto field path.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// A named thing (adapter) does not exist, or failed to load.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but this server cannot do it (e.g. no chat template).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (e.g. load an adapter from outside the adapter roots).
    #[error("{0}")]
    PermissionDenied(String),
    /// A compare-and-set or concurrent-operation conflict; retry.
    #[error("{0}")]
    Aborted(String),
    /// Over a memory budget with nothing to evict.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over a queue bound, a concurrency limit or a rate limit: refused at once, with a
    /// hint of when a retry may succeed (gRPC: RESOURCE_EXHAUSTED with a `retry-after-ms`
    /// trailer; HTTP: 429 with `Retry-After`).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_ms: u64,
    },
    /// No valid API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The engine is not running.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl RequestError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The engine thread is gone.
    pub fn engine_stopped() -> Self {
        Self::Unavailable("the engine has stopped".into())
    }

    /// What went wrong, without the field name.
    pub fn detail(&self) -> &str {
        match self {
            Self::InvalidArgument { message, .. } => message,
            Self::NotFound(m)
            | Self::FailedPrecondition(m)
            | Self::PermissionDenied(m)
            | Self::Aborted(m)
            | Self::ResourceExhausted(m)
            | Self::Overloaded { message: m, .. }
            | Self::Unauthenticated(m)
            | Self::DeadlineExceeded(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => m,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Aborted(_) => Code::Aborted,
            Self::ResourceExhausted(_) | Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status the OpenAI-compatible front answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InvalidArgument { .. } | Self::FailedPrecondition(_) => 400,
            Self::PermissionDenied(_) => 403,
            Self::NotFound(_) => 404,
            Self::Aborted(_) => 409,
            Self::ResourceExhausted(_) | Self::Overloaded { .. } => 429,
            Self::Unauthenticated(_) => 401,
            Self::DeadlineExceeded(_) => 504,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
        }
    }

    /// The gRPC code's canonical name (as in `grpc-status` documentation), for metrics.
    pub fn grpc_code_name(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::Aborted(_) => "ABORTED",
            Self::ResourceExhausted(_) | Self::Overloaded { .. } => "RESOURCE_EXHAUSTED",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// Milliseconds after which a retry may succeed (overload refusals only).
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

/// The gRPC trailer carrying [`RequestError::retry_after_ms`].
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let Some(ms) = e.retry_after_ms() {
            status
                .metadata_mut()
                .insert(RETRY_AFTER_MS, tonic::metadata::MetadataValue::from(ms));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_code_and_the_field_leads_the_message() {
        let e = RequestError::invalid("sampling.top_p", "must be in (0, 1], got 2");
        let status = Status::from(e.clone());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "sampling.top_p: must be in (0, 1], got 2");
        let cases = [
            (RequestError::NotFound("x".into()), Code::NotFound),
            (
                RequestError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                RequestError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
            (RequestError::Aborted("x".into()), Code::Aborted),
            (
                RequestError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (RequestError::engine_stopped(), Code::Unavailable),
            (
                RequestError::Unauthenticated("x".into()),
                Code::Unauthenticated,
            ),
            (
                RequestError::DeadlineExceeded("x".into()),
                Code::DeadlineExceeded,
            ),
            (RequestError::Internal("x".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn an_overload_refusal_carries_its_retry_hint() {
        let e = RequestError::Overloaded {
            message: "the queue is full".into(),
            retry_after_ms: 250,
        };
        assert_eq!(e.http_status(), 429);
        let status = Status::from(e);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let hint = status.metadata().get(RETRY_AFTER_MS).unwrap();
        assert_eq!(hint.to_str().unwrap(), "250");
    }
}
