//! Two `multilora serve` processes on the real model, on their own ports, with different
//! adapters in flight: the gateway's LoRA-affinity rule applied to each one's
//! `/metrics` (by `gateway_metrics.py affinity`, with prometheus_client's parser) scores
//! each adapter by what that server actually holds, as its `GetEngineStats` reports it.
//! - Server A (`--max-active-adapters 1`, `--max-running 1`): alpha runs, beta waits,
//!   so alpha scores 1.0, beta 0.6 (waiting) and gamma 0 (no room).
//! - Server B (`--max-active-adapters 4`): beta runs, so beta scores 1.0 and alpha and
//!   gamma 0.8 (room for another adapter).
mod common;

use common::python::run_python;
use common::*;
use multilora::proto::v1 as pb;
use pb::generation_client::GenerationClient;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process and its two addresses; killed when dropped.
struct Process {
    _child: Child,
    grpc: GenerationClient<Channel>,
    metrics_url: String,
}

async fn spawn_server(extra: &[&str]) -> Process {
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .arg("serve")
        .arg("--model")
        .arg(real_model_path())
        .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--kv-cache-memory", "64MiB"])
        .arg("--adapter")
        .arg(format!(
            "alpha={}",
            fixture_adapter("alpha-lora-r8-qv").display()
        ))
        .arg("--adapter")
        .arg(format!(
            "beta={}",
            fixture_adapter("beta-lora-r16-all").display()
        ))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let grpc = loop {
        if let Ok(c) = GenerationClient::connect(endpoint.clone()).await {
            break c;
        }
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "the server never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Process {
        _child: child,
        grpc,
        metrics_url: format!("http://127.0.0.1:{http_port}/metrics"),
    }
}

/// A long request for `adapter`, left in flight (its stream is held, not read).
async fn start_long(p: &Process, adapter: &str) -> tonic::Streaming<pb::GenerateResponse> {
    let mut req = greedy(vec![1, 2, 3], 1000);
    req.adapter = adapter.into();
    req.ignore_eos = true;
    p.grpc.clone().generate(req).await.unwrap().into_inner()
}

/// Adapters running and waiting on `p`, as `GetEngineStats` reports them.
async fn held(p: &Process) -> (Vec<String>, Vec<String>) {
    let s = p
        .grpc
        .clone()
        .get_engine_stats(pb::GetEngineStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .adapters
        .unwrap();
    (
        common::adapters_with_work(s.running_by_adapter),
        common::adapters_with_work(s.waiting_by_adapter),
    )
}

async fn wait_until_held(p: &Process, want: (&[&str], &[&str])) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (running, waiting) = held(p).await;
        if running == want.0 && waiting == want.1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never held {want:?}: {running:?} {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model and the Python venv: make test"]
async fn lora_affinity_scores_follow_what_each_server_holds() {
    let a = spawn_server(&["--max-active-adapters", "1", "--max-running", "1"]).await;
    let b = spawn_server(&["--max-active-adapters", "4"]).await;
    let _a_alpha = start_long(&a, "alpha").await;
    wait_until_held(&a, (&["alpha"], &[])).await;
    let _a_beta = start_long(&a, "beta").await;
    let _b_beta = start_long(&b, "beta").await;
    wait_until_held(&a, (&["alpha"], &["beta"])).await;
    wait_until_held(&b, (&["beta"], &[])).await;

    let out = run_python(
        "tests/python/gateway_metrics.py",
        [
            "affinity",
            "--adapters",
            "alpha,beta,gamma",
            &a.metrics_url,
            &b.metrics_url,
        ],
    )
    .await;
    let scores: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        scores[&a.metrics_url],
        json!({"alpha": 1.0, "beta": 0.6, "gamma": 0.0}),
        "{scores}"
    );
    assert_eq!(
        scores[&b.metrics_url],
        json!({"alpha": 0.8, "beta": 1.0, "gamma": 0.8}),
        "{scores}"
    );
    // Nothing moved while the metrics were read.
    assert_eq!(held(&a).await, (vec!["alpha".into()], vec!["beta".into()]));
    assert_eq!(held(&b).await, (vec!["beta".into()], vec![]));
}
