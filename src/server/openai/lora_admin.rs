//! vLLM's runtime LoRA endpoints, so tooling written for vLLM manages our adapters:
//! `POST /v1/load_lora_adapter` (`lora_name`, `lora_path`, optional `load_inplace`) and
//! `POST /v1/unload_lora_adapter` (`lora_name`), on the same registry as the gRPC
//! Adapters service. As in vLLM, loading a name that is already loaded is refused (400)
//! unless `load_inplace` is set, which reads the path again (its files may have changed)
//! and replaces the version without disturbing requests in flight; unloading an unknown name is 404; success is a plain-text 200.
use super::error::ApiError;
use super::parse;
use crate::error::RequestError;
use crate::lora::registry::AdapterRegistry;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadLora {
    lora_name: String,
    lora_path: String,
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadLora {
    lora_name: String,
    /// Accepted and ignored, as vLLM does.
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

/// Field names of the registry reported as vLLM's.
fn vllm_field(e: RequestError) -> RequestError {
    match e {
        RequestError::InvalidArgument { field, message } => {
            let field = match field.as_str() {
                "name" => "lora_name".to_string(),
                "source" => "lora_path".to_string(),
                _ => field,
            };
            RequestError::InvalidArgument { field, message }
        }
        other => other,
    }
}

pub async fn load(registry: &AdapterRegistry, body: &Bytes) -> Response {
    let req: LoadLora = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if req.lora_path.is_empty() {
        let e = RequestError::invalid("lora_path", "is empty");
        return ApiError(e).into_response();
    }
    // Compare-and-set on "no loaded version" unless replacing, so two concurrent loads
    // of one name cannot both succeed.
    let loaded = if req.load_inplace {
        registry.reload(&req.lora_name, &req.lora_path).await
    } else {
        registry.load(&req.lora_name, &req.lora_path, Some(0)).await
    };
    match loaded {
        Ok(_) => (
            StatusCode::OK,
            format!(
                "Success: LoRA adapter '{}' added successfully.",
                req.lora_name
            ),
        )
            .into_response(),
        Err(RequestError::Aborted(_)) => ApiError(RequestError::invalid(
            "lora_name",
            format!(
                "the lora adapter '{}' has already been loaded (set load_inplace to replace it)",
                req.lora_name
            ),
        ))
        .into_response(),
        Err(e) => ApiError(vllm_field(e)).into_response(),
    }
}

pub async fn unload(registry: &AdapterRegistry, body: &Bytes) -> Response {
    let req: UnloadLora = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match registry.unload(&req.lora_name) {
        Ok(_) => (
            StatusCode::OK,
            format!(
                "Success: LoRA adapter '{}' removed successfully.",
                req.lora_name
            ),
        )
            .into_response(),
        Err(e) => ApiError(vllm_field(e)).into_response(),
    }
}
