//! Tenants over both fronts: a bad or missing key is UNAUTHENTICATED (HTTP 401), a
//! tenant asking for another's adapter is PERMISSION_DENIED (403) and never served by
//! the base model, an inference-only key cannot manage adapters, `/v1/models` lists only
//! what the caller may use, and per-tenant usage shows in the stats. After each refusal
//! the next valid request succeeds.
mod common;

use common::http::{post, request};
use common::{greedy, synth_lora_dir, with_http, TestServer};
use multilora::proto::v1 as pb;
use multilora::server::tenants::{key_digest, Tenants};
use serde_json::json;
use tonic::Code;

fn tenants() -> Tenants {
    let text = format!(
        r#"
[[tenant]]
name = "acme"
api_key_sha256 = ["{acme}"]
adapters = ["acme-*"]

[[tenant]]
name = "globex"
api_key_sha256 = ["{globex}"]
adapters = ["globex-sql"]
base_model = false

[[tenant]]
name = "ops"
api_key_sha256 = ["{ops}"]
adapters = ["*"]
manage_adapters = true
"#,
        acme = key_digest("acme-key"),
        globex = key_digest("globex-key"),
        ops = key_digest("ops-key"),
    );
    Tenants::from_toml(&text).unwrap()
}

/// A server with the tenants above and adapters `acme-chat` and `globex-sql` (in the
/// returned folder).
async fn serve_tenants(
    options: multilora::server::ServerOptions,
) -> (tempfile::TempDir, common::Started) {
    let dir = tempfile::tempdir().unwrap();
    let service = TestServer::tiny()
        .register("acme-chat", synth_lora_dir(dir.path(), "acme-chat", 1))
        .register("globex-sql", synth_lora_dir(dir.path(), "globex-sql", 2))
        .service()
        .with_tenants(tenants());
    (dir, common::Started::serve(service, options).await)
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn on_adapter(adapter: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        adapter: adapter.into(),
        ..greedy(vec![5, 6, 7], 3)
    }
}

async fn unary(
    gen: &mut pb::generation_client::GenerationClient<tonic::transport::Channel>,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<pb::GenerateResult, tonic::Status> {
    gen.generate_unary(req).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_adapters_and_admin_rights_are_enforced_over_grpc() {
    let (dir, started) = serve_tenants(Default::default()).await;
    let mut gen = started.gen.clone();
    let good = || with_key(on_adapter("acme-chat"), "acme-key");

    let cases: Vec<(tonic::Request<pb::GenerateRequest>, Code)> = vec![
        (
            tonic::Request::new(on_adapter("acme-chat")),
            Code::Unauthenticated,
        ),
        (
            with_key(on_adapter("acme-chat"), "wrong"),
            Code::Unauthenticated,
        ),
        (
            with_key(on_adapter("globex-sql"), "acme-key"),
            Code::PermissionDenied,
        ),
        (
            with_key(on_adapter("no-such"), "acme-key"),
            Code::PermissionDenied,
        ),
        (
            with_key(on_adapter(""), "globex-key"),
            Code::PermissionDenied,
        ),
        (
            with_key(on_adapter("acme-chat"), "globex-key"),
            Code::PermissionDenied,
        ),
    ];
    for (i, (req, code)) in cases.into_iter().enumerate() {
        let e = unary(&mut gen, req).await.unwrap_err();
        assert_eq!(e.code(), code, "case {i}: {e:?}");
        let ok = unary(&mut gen, good()).await.unwrap();
        assert_eq!(ok.token_ids.len(), 3, "after case {i}");
    }
    // A request for another tenant's adapter never started a load of it.
    let mut admin = started.adapters().await;
    let globex = admin
        .get_adapter(with_key(
            pb::GetAdapterRequest {
                name: "globex-sql".into(),
            },
            "ops-key",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(globex.state(), pb::AdapterState::Registered);

    // Managing adapters takes a key that may.
    let load = |key: &str| {
        with_key(
            pb::LoadAdapterRequest {
                name: "acme-new".into(),
                source: dir.path().join("acme-chat").display().to_string(),
                ..Default::default()
            },
            key,
        )
    };
    let e = admin.load_adapter(load("acme-key")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = admin.list_adapters(tonic::Request::new(pb::ListAdaptersRequest::default()));
    assert_eq!(e.await.unwrap_err().code(), Code::Unauthenticated);
    admin.load_adapter(load("ops-key")).await.unwrap();
    let ok = unary(&mut gen, with_key(on_adapter("acme-new"), "acme-key")).await;
    assert_eq!(ok.unwrap().token_ids.len(), 3);

    // Usage by tenant: a tenant sees its own; a manager sees everyone's.
    let own = gen
        .get_engine_stats(with_key(pb::GetEngineStatsRequest {}, "acme-key"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.tenants.len(), 1);
    let acme = &own.tenants["acme"];
    // Six good requests after the refusals, one on the new adapter; refusals for a
    // key or a permission happen before admission, so none counts as refused.
    assert_eq!((acme.requests, acme.refused), (7, 0));
    assert_eq!((acme.prompt_tokens, acme.completion_tokens), (21, 21));
    let all = gen
        .get_engine_stats(with_key(pb::GetEngineStatsRequest {}, "ops-key"))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&String> = all.tenants.keys().collect();
    assert_eq!(names.len(), 3, "{names:?}");
    started.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_front_checks_the_bearer_key_and_lists_only_usable_models() {
    let (dir, started) = serve_tenants(with_http()).await;
    let addr = started.server.http_addr.unwrap();
    let auth = |key: &str| vec![("authorization", format!("Bearer {key}"))];
    let body = |model: &str| {
        json!({"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0}).to_string()
    };
    let complete = |model: &'static str, headers: Vec<(&'static str, String)>| {
        let b = body(model);
        async move { request(addr, "POST", "/v1/completions", &b, &headers).await }
    };

    let models = request(addr, "GET", "/v1/models", "", &auth("globex-key")).await;
    assert_eq!(models.status, 200);
    let models = models.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["globex-sql"],
        "no base model, no other tenant's adapter"
    );
    let none = request(addr, "GET", "/v1/models", "", &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate").as_deref(), Some("Bearer"));

    let cases = [
        (auth("nope"), "acme-chat", 401, "authentication_error"),
        (vec![], "acme-chat", 401, "authentication_error"),
        (auth("acme-key"), "globex-sql", 403, "permission_error"),
    ];
    for (headers, model, code, kind) in cases {
        let err = complete(model, headers).await;
        let kind_got = err.json()["error"]["type"].as_str().map(String::from);
        assert_eq!(
            (err.status, kind_got.as_deref()),
            (code, Some(kind)),
            "{}",
            err.body
        );
        let ok = complete("acme-chat", auth("acme-key")).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    let load = json!({"lora_name": "x", "lora_path": dir.path().join("acme-chat")});
    let denied = request(
        addr,
        "POST",
        "/v1/load_lora_adapter",
        &load.to_string(),
        &auth("acme-key"),
    )
    .await;
    assert_eq!(denied.status, 403);
    let (status, _) = post(addr, "/v1/load_lora_adapter", load).await;
    assert_eq!(status, 401, "no key");
    started.stop().await;
}
