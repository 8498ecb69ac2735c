//! The OpenAI-compatible HTTP front (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions` (streamed as Server-Sent Events or not),
//! `GET /v1/models`, vLLM's `POST /v1/load_lora_adapter` / `unload_lora_adapter`
//! (`lora_admin`) and Prometheus `GET /metrics` (`super::exposition`), on the same
//! [`GenerationService`] as gRPC: one validation, one
//! adapter lifecycle, one error mapping (in OpenAI's error shape, see `error.rs`).
//! Invariant: a request either gets a whole response, an error with its status before
//! any byte of a stream, or a stream that ends with `data: [DONE]`; a client that goes
//! away drops its engine stream, so the engine aborts the sequence within one step.
mod body;
mod error;
mod lora_admin;
mod respond;

use super::caller::Caller;
use super::exposition;
use super::generation::GenerationService;
use super::observe::Protocol;
use super::tls::TlsListener;
use crate::error::RequestError;
use crate::proto::v1::GenerateRequest;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use body::{ChatRequest, Common, CompletionRequest};
use error::ApiError;
use respond::{Api, Head};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The front's shared state.
#[derive(Clone)]
struct Front {
    service: GenerationService,
    next_id: Arc<AtomicU64>,
}

/// The routes over `service`.
pub fn router(service: GenerationService) -> Router {
    let front = Front {
        service,
        next_id: Arc::new(AtomicU64::new(1)),
    };
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError(RequestError::NotFound("no such route".into())).into_response()
        })
        .with_state(front)
}

/// Serves the routes on `listener` (over TLS where `tls` is given) until `shutdown`
/// resolves, then lets in-flight requests finish (the engine's drain deadline bounds
/// them).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: GenerationService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let routes = router(service);
    match tls {
        Some(tls) => {
            axum::serve(TlsListener::new(listener, tls), routes)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, routes)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body as `T`, or a 400 saying why not.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(RequestError::invalid(
            "body",
            format!("not a valid request: {e}"),
        ))
    })
}

async fn completions(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    let base = front.service.info.model_name.clone();
    let caller = Caller::from_http(&front.service.tenants, &headers);
    let req = parse::<CompletionRequest>(&body).map(|r| (r.to_pb(&base), r.common));
    respond(front, caller, req, Api::Completion).await
}

async fn chat_completions(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    let base = front.service.info.model_name.clone();
    let caller = Caller::from_http(&front.service.tenants, &headers);
    let req = parse::<ChatRequest>(&body).map(|r| (r.to_pb(&base), r.common));
    respond(front, caller, req, Api::Chat).await
}

/// Starts the generation (errors answered with their status, and counted as rejected
/// HTTP requests) and answers it whole or streamed.
async fn respond(
    front: Front,
    caller: Result<Caller, RequestError>,
    req: Result<(Result<GenerateRequest, RequestError>, Common), ApiError>,
    api: Api,
) -> Response {
    // An unknown key is answered as such before anything about the body.
    let req = match &caller {
        Err(e) => Err(ApiError(e.clone())),
        Ok(_) => req,
    };
    let (pb, common) = match req {
        Ok((Ok(pb), common)) => (pb, common),
        Ok((Err(e), _)) | Err(ApiError(e)) => {
            front.service.metrics.rejected(Protocol::Http, &e);
            return ApiError(e).into_response();
        }
    };
    let include_usage = common.include_usage();
    let rx = match front.service.start(pb, caller, Protocol::Http).await {
        Ok((rx, _version)) => rx,
        Err(e) => return ApiError(e).into_response(),
    };
    let prefix = match api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let head = Head {
        api,
        id: format!("{prefix}-{}", front.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: common.model,
        tokenizer: front.service.tokenizer.clone(),
    };
    if common.stream {
        return Sse::new(respond::event_stream(head, include_usage, rx)).into_response();
    }
    match respond::collect(&head, rx).await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`: the base model, then every registered adapter with `parent` = the
/// base; of those, only what the caller may use.
async fn models(State(front): State<Front>, headers: HeaderMap) -> Response {
    let tenant = match Caller::from_http(&front.service.tenants, &headers) {
        Ok(caller) => caller.tenant,
        Err(e) => return ApiError(e).into_response(),
    };
    let base = &front.service.info.model_name;
    let created = unix_now();
    let mut data = vec![];
    if tenant.spec.base_model {
        data.push(json!({
            "id": base, "object": "model", "created": created, "owned_by": "multilora",
            "root": base, "parent": null,
            "max_model_len": front.service.info.context_length,
        }));
    }
    let adapters = front.service.adapters.list();
    for a in adapters.iter().filter(|a| tenant.may_use_adapter(&a.name)) {
        data.push(json!({
            "id": a.name, "object": "model", "created": created, "owned_by": "multilora",
            "root": a.source, "parent": base,
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The caller, if it may manage adapters.
fn manager(front: &Front, headers: &HeaderMap) -> Result<(), ApiError> {
    let caller = Caller::from_http(&front.service.tenants, headers)?;
    Ok(caller.tenant.check_manage()?)
}

async fn load_lora(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = manager(&front, &headers) {
        return e.into_response();
    }
    lora_admin::load(&front.service.adapters, &body).await
}

async fn unload_lora(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = manager(&front, &headers) {
        return e.into_response();
    }
    lora_admin::unload(&front.service.adapters, &body).await
}

/// `GET /metrics`: the Prometheus text exposition (see `exposition`).
async fn metrics(State(front): State<Front>) -> Response {
    match exposition::render(&front.service).await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}
