//! Request errors and their one mapping to gRPC status codes. Messages name the field.
use crate::lora::registry::RegistryError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The request is malformed; `field` is the proto field path.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// A named thing (adapter) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but this server cannot do it (e.g. no chat template).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A compare-and-set or concurrent-operation conflict; retry.
    #[error("{0}")]
    Aborted(String),
    /// Over a memory budget with nothing to evict.
    #[error("{0}")]
    ResourceExhausted(String),
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

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<RegistryError> for RequestError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(m) => Self::NotFound(m),
            RegistryError::Invalid(m) => Self::InvalidArgument {
                field: "adapter".into(),
                message: m,
            },
            RegistryError::Conflict(m) => Self::Aborted(m),
            RegistryError::Exhausted(m) => Self::ResourceExhausted(m),
            RegistryError::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<crate::engine::EngineError> for RequestError {
    fn from(e: crate::engine::EngineError) -> Self {
        Self::Unavailable(e.to_string())
    }
}
