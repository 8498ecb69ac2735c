//! The load harness against a live server on the tiny random model: every request
//! succeeds and matches its solo run (`verify`), the counts add up, the JSON parses,
//! and requests the server refuses are counted by gRPC code, not lost; adapter churn
//! beside the traffic is counted (failures by code) and changes no response.
mod common;

use clap::Parser;
use common::*;
use multilora::bench::churn::{list_sources, ChurnConfig};
use multilora::bench::cli::{run_cli, BenchArgs};
use multilora::bench::report::Report;
use multilora::bench::runner::{plan, run, BenchConfig, LoadMode, BUILTIN_CORPUS};
use multilora::bench::workload::{Arrivals, Length, Popularity};
use multilora::lora::peft::{LoraSite, CONFIG_FILE, WEIGHTS_FILE};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::proto::v1 as pb;

async fn server_with_adapters(dir: &std::path::Path) -> multilora::server::RunningServer {
    let mut server = TestServer::tiny();
    let base = server.base_shape();
    for i in 0..2 {
        let p = dir.join(format!("good-{i}"));
        let spec = SynthSpec {
            kind: Default::default(),
            rank: 4,
            alpha: 16.0,
            sites: vec![LoraSite::Q, LoraSite::V, LoraSite::Down],
            seed: i,
        };
        write_synthetic_adapter(&p, &base, &spec).unwrap();
        server = server.register(&format!("good-{i}"), p);
    }
    server.start().await.server
}

fn config(endpoint: String, adapters: &[&str], mode: LoadMode, requests: usize) -> BenchConfig {
    BenchConfig {
        endpoint,
        adapters: adapters.iter().map(|s| s.to_string()).collect(),
        popularity: Popularity::Uniform,
        base_share: 0.2,
        tenants: 2,
        mode,
        input_len: Length::Uniform { lo: 8, hi: 16 },
        output_len: Length::Uniform { lo: 4, hi: 12 },
        ignore_eos: true,
        corpus: BUILTIN_CORPUS.into(),
        requests,
        duration: None,
        warmup: 0,
        seed: 7,
        slo: None,
        verify: true,
        progress: false,
        churn: None,
        api_keys: vec![],
        deadline: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_run_succeeds_verifies_and_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_adapters(dir.path()).await;
    let cfg = config(
        server.endpoint(),
        &["good-0", "good-1"],
        LoadMode::Closed { concurrency: 4 },
        24,
    );
    let report = run(&cfg).await.unwrap();
    let s = &report.summary;
    assert_eq!((s.requests, s.succeeded), (24, 24), "{:?}", s.errors);
    assert_eq!(report.verify_mismatches, Some(0));
    assert_eq!(report.records.len(), 24);
    let per_adapter: usize = report.by_adapter.values().map(|a| a.requests).sum();
    let per_tenant: usize = report.by_tenant.values().map(|a| a.requests).sum();
    assert_eq!((per_adapter, per_tenant), (24, 24));
    let tokens: usize = report.records.iter().map(|r| r.token_times.len()).sum();
    assert_eq!(s.output_tokens, tokens);
    assert!(tokens >= 24 * 4);
    assert_eq!(s.ttft.count, 24);
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["records"].as_array().unwrap().len(), 24);
    assert_eq!(json["summary"]["succeeded"], 24);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_by_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_adapters(dir.path()).await;
    let arrivals = Arrivals::new(300.0, 1.0).unwrap();
    let mut cfg = config(
        server.endpoint(),
        &["good-0", "ghost"],
        LoadMode::Open {
            arrivals,
            max_concurrency: Some(8),
        },
        30,
    );
    cfg.verify = false;
    // The same plan the runner makes: how many name the adapter that does not exist.
    let mut client = pb::generation_client::GenerationClient::connect(server.endpoint())
        .await
        .unwrap();
    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: BUILTIN_CORPUS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    let ghosts = plan(&cfg, &ids)
        .unwrap()
        .iter()
        .filter(|p| p.adapter == "ghost")
        .count();
    assert!(ghosts > 0);
    let report = run(&cfg).await.unwrap();
    let s = &report.summary;
    assert_eq!(s.requests, 30);
    assert_eq!(s.errors.get("NOT_FOUND").copied().unwrap_or(0), ghosts);
    assert_eq!(s.succeeded + ghosts, 30);
    assert_eq!(report.by_adapter["ghost"].succeeded, 0);
    server.stop().await.unwrap();
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_writes_a_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_adapters(dir.path()).await;
    let json = dir.path().join("report.json");
    let plots = dir.path().join("plots");
    let cli = Cli::parse_from([
        "bench",
        "--endpoint",
        &server.endpoint(),
        "--num-adapters",
        "2",
        "--adapter-prefix",
        "good",
        "--popularity",
        "powerlaw:0.5",
        "--rate",
        "100",
        "--cv",
        "2",
        "--requests",
        "12",
        "--warmup",
        "2",
        "--input-len",
        "lognormal:12,0.3",
        "--output-len",
        "6",
        "--ignore-eos",
        "--slo",
        "ttft=10s,tpot=1s",
        "--verify",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
        "--label",
        "tiny",
    ]);
    run_cli(&cli.bench).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        v["records"].as_array().unwrap().len(),
        10,
        "warm-up excluded"
    );
    assert_eq!(v["summary"]["succeeded"], 10);
    assert_eq!(v["verify_mismatches"], 0);
    assert!(v["summary"]["goodput"].as_f64().unwrap() > 0.0);
    assert!(v["records"][0]["token_times"].as_array().unwrap().len() == 6);
    // The setup says what ran, and a sweep summary can read the report.
    assert_eq!(v["setup"]["label"], "tiny");
    assert_eq!(v["setup"]["adapters"], 2);
    assert_eq!(v["setup"]["popularity"], "powerlaw:0.5");
    let row = multilora::bench::sweep::SweepRow::from_report(&v).unwrap();
    assert_eq!(
        (row.series.as_str(), row.adapters, row.requests),
        ("tiny", 2, 10)
    );
    for plot in ["latency_cdf.svg", "throughput.svg"] {
        let text = std::fs::read_to_string(plots.join(plot)).unwrap();
        assert!(text.contains("<svg"), "{plot}");
    }
    server.stop().await.unwrap();
}

/// Writes `n` synthetic adapters for the tiny model into `dir`; returns `dir`'s path.
fn churn_sources(dir: &std::path::Path, n: u64) -> String {
    let base = TestServer::tiny().base_shape();
    for i in 0..n {
        let spec = SynthSpec {
            kind: Default::default(),
            rank: 2,
            alpha: 4.0,
            sites: vec![LoraSite::Q, LoraSite::O],
            seed: 100 + i,
        };
        write_synthetic_adapter(&dir.join(format!("src-{i}")), &base, &spec).unwrap();
    }
    dir.to_str().unwrap().to_string()
}

async fn adapter_names(endpoint: String) -> Vec<String> {
    let mut admin = pb::adapters_client::AdaptersClient::connect(endpoint)
        .await
        .unwrap();
    let list = admin
        .list_adapters(pb::ListAdaptersRequest::default())
        .await
        .unwrap()
        .into_inner();
    list.adapters.into_iter().map(|a| a.name).collect()
}

/// 40 verified requests over good-0 and good-1 (4 streams) with 40 churn operations
/// per second loading from the adapter folders in `sources`.
async fn run_with_churn(endpoint: String, sources: &str) -> Report {
    let mut cfg = config(
        endpoint,
        &["good-0", "good-1"],
        LoadMode::Closed { concurrency: 4 },
        40,
    );
    cfg.churn = Some(ChurnConfig {
        rate: 40.0,
        sources: list_sources(std::path::Path::new(sources)).unwrap(),
        name_prefix: "churn".into(),
        api_key: None,
    });
    run(&cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_loads_and_unloads_beside_verified_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_adapters(dir.path()).await;
    let sources_dir = tempfile::tempdir().unwrap();
    let sources = churn_sources(sources_dir.path(), 3);
    let report = run_with_churn(server.endpoint(), &sources).await;
    let s = &report.summary;
    assert_eq!((s.requests, s.succeeded), (40, 40), "{:?}", s.errors);
    assert_eq!(report.verify_mismatches, Some(0), "churn changed no output");
    let churn = report.churn.as_ref().unwrap();
    assert!(churn.loads >= 2, "{churn:?}");
    assert!(churn.errors.is_empty(), "{churn:?}");
    // Loads and unloads alternate, starting with a load.
    assert!(churn.loads - churn.unloads <= 1);
    assert_eq!(churn.load_latency.count, churn.loads);
    let kinds: Vec<&str> = report.churn_ops.iter().map(|o| o.kind.as_str()).collect();
    assert!(kinds
        .chunks(2)
        .all(|k| k[0] == "load" && k.get(1).is_none_or(|u| *u == "unload")));
    // What churn loaded is gone after the run; the traffic's adapters stay.
    let mut names = adapter_names(server.endpoint()).await;
    names.sort();
    assert_eq!(names, ["good-0", "good-1"]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_churn_is_counted_and_leaves_traffic_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_adapters(dir.path()).await;
    let sources_dir = tempfile::tempdir().unwrap();
    let sources = churn_sources(sources_dir.path(), 1);
    // A second source whose weights are cut short: every load of it fails.
    let broken = sources_dir.path().join("src-9");
    std::fs::create_dir(&broken).unwrap();
    let good = sources_dir.path().join("src-0");
    std::fs::copy(good.join(CONFIG_FILE), broken.join(CONFIG_FILE)).unwrap();
    let weights = std::fs::read(good.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(broken.join(WEIGHTS_FILE), &weights[..weights.len() / 2]).unwrap();
    let report = run_with_churn(server.endpoint(), &sources).await;
    assert_eq!(report.summary.succeeded, 40, "{:?}", report.summary.errors);
    assert_eq!(report.verify_mismatches, Some(0));
    let churn = report.churn.as_ref().unwrap();
    let failed = report
        .churn_ops
        .iter()
        .filter(|o| o.error.is_some())
        .count();
    assert!(failed >= 1, "{churn:?}");
    assert_eq!(churn.errors.get("INVALID_ARGUMENT"), Some(&failed));
    assert!(report
        .churn_ops
        .iter()
        .filter(|o| o.error.is_some())
        .all(|o| o.kind.as_str() == "load"));
    let mut names = adapter_names(server.endpoint()).await;
    names.sort();
    assert_eq!(names, ["good-0", "good-1"]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_drive_an_authenticated_server_one_key_per_tenant() {
    use multilora::server::tenants::{key_digest, Tenants};
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::tiny();
    for i in 0..2 {
        server = server.register(
            &format!("good-{i}"),
            synth_lora_dir(dir.path(), &format!("good-{i}"), i),
        );
    }
    let tenants = Tenants::from_toml(&format!(
        "[[tenant]]\nname = \"zero\"\napi_key_sha256 = [\"{}\"]\nadapters = [\"good-0\"]\n\
         [[tenant]]\nname = \"one\"\napi_key_sha256 = [\"{}\"]\nadapters = [\"good-1\"]\n",
        key_digest("key-0"),
        key_digest("key-1")
    ))
    .unwrap();
    let started = Started::serve(server.service().with_tenants(tenants), Default::default()).await;
    let mut cfg = config(
        started.server.endpoint(),
        &["good-0", "good-1"],
        LoadMode::Closed { concurrency: 4 },
        20,
    );
    cfg.verify = false;
    let refused = run(&cfg).await.unwrap_err();
    assert!(format!("{refused:#}").contains("API key"), "{refused:#}");
    cfg.api_keys = vec!["key-0".into(), "key-1".into()];
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.summary.succeeded, 20, "{:?}", report.summary.errors);
    let mut gen = started.gen.clone();
    let mut req = tonic::Request::new(pb::GetEngineStatsRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer key-0".parse().unwrap());
    let usage = gen
        .get_engine_stats(req)
        .await
        .unwrap()
        .into_inner()
        .tenants;
    // Base requests send the first key, so tenant zero has its adapter's and the base's.
    let zero = report.by_tenant["tenant-0"].requests + report.by_tenant["base"].requests;
    assert_eq!(usage["zero"].requests as usize, zero);
    started.stop().await;
}
