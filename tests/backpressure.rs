//! Hostile load: a burst of ten times the queue bound (the excess refused at once with
//! RESOURCE_EXHAUSTED and a `retry-after-ms` trailer, the queue never past its bound,
//! every admitted request finished), deadlines (one that passes in the queue never
//! starts; one that passes mid-generation stops and frees its KV blocks), and the health
//! watchdog (a stalled engine loop is NOT_SERVING within a second). After each, the next
//! valid request succeeds.
mod common;

use common::{greedy, Started, TestServer};
use multilora::engine::EngineConfig;
use multilora::error::RETRY_AFTER_MS;
use multilora::proto::v1 as pb;
use multilora::server::admission::QueueBounds;
use multilora::server::ServerOptions;
use multilora::testing::tiny_config;
use pb::generation_client::GenerationClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// A random model slow enough (8 layers, hidden 256) that a few hundred tokens take a
/// noticeable time, so a queue forms; its context (4,096) lets one request run for
/// thousands of steps, however fast the machine.
fn slow_model(max_running: usize) -> TestServer {
    let mut cfg = tiny_config(common::TINY_VOCAB);
    cfg.hidden_size = 256;
    cfg.intermediate_size = 1024;
    cfg.num_layers = 8;
    cfg.max_position_embeddings = 4096;
    TestServer::random(cfg, 5).engine(EngineConfig {
        max_running,
        ..Default::default()
    })
}

async fn stats(gen: &mut GenerationClient<Channel>) -> pb::EngineStats {
    gen.get_engine_stats(pb::GetEngineStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn long(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        ignore_eos: true,
        ..greedy(vec![3, 4, 5, 6], max_new_tokens)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_times_the_bound_is_refused_at_once_and_the_queue_holds() {
    let bound = 4;
    let service = slow_model(2).service().with_queue_bounds(QueueBounds {
        max_waiting_requests: bound,
        max_waiting_tokens: 1 << 20,
    });
    let started = Started::serve(service, Default::default()).await;
    let burst: Vec<_> = (0..10 * bound)
        .map(|_| {
            let mut c = started.gen.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = c.generate_unary(long(48)).await;
                (r, t.elapsed())
            })
        })
        .collect();
    let mut watcher = started.gen.clone();
    let watch = tokio::spawn(async move {
        let mut most = (0, 0);
        for _ in 0..100 {
            let s = stats(&mut watcher).await;
            most.0 = most.0.max(s.queued_requests);
            most.1 = most.1.max(s.waiting_sequences);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        most
    });
    let (mut ok, mut refused, mut slowest_refusal) = (0, 0, Duration::ZERO);
    for h in burst {
        match h.await.unwrap() {
            (Ok(r), _) => {
                assert_eq!(r.into_inner().token_ids.len(), 48);
                ok += 1;
            }
            (Err(e), took) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                let hint = e.metadata().get(RETRY_AFTER_MS).expect("a retry hint");
                assert!(hint.to_str().unwrap().parse::<u64>().unwrap() > 0);
                slowest_refusal = slowest_refusal.max(took);
                refused += 1;
            }
        }
    }
    let (queued, waiting) = watch.await.unwrap();
    assert!(queued as usize <= bound, "queued {queued}");
    assert!(waiting as usize <= bound, "engine queue {waiting}");
    assert!(
        refused >= 10 * bound / 2,
        "only {refused} refused of {}",
        10 * bound
    );
    assert!(ok >= bound, "{ok} admitted");
    eprintln!(
        "burst of {}: {ok} admitted, {refused} refused; slowest refusal {slowest_refusal:?}",
        10 * bound
    );
    let mut gen = started.gen.clone();
    let after = gen.generate_unary(long(4)).await.unwrap().into_inner();
    assert_eq!(after.token_ids.len(), 4);
    let s = stats(&mut gen).await;
    assert_eq!((s.queued_requests, s.refused_requests), (0, refused as u64));
    assert_eq!(s.kv_blocks_free, s.kv_blocks_total);
    started.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_in_the_queue_never_starts_the_request() {
    let started = slow_model(1).start().await;
    let blockers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = started.gen.clone();
            tokio::spawn(async move { c.generate_unary(long(1500)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut gen = started.gen.clone();
    let mut req = tonic::Request::new(long(4));
    req.set_timeout(Duration::from_millis(200));
    let t = Instant::now();
    let e = common::generate_request(&mut gen, req).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(took >= Duration::from_millis(190), "{took:?}");
    let s = stats(&mut gen).await;
    assert_eq!(s.deadline_expired_waiting, 1, "it never reached prefill");
    assert_eq!(s.deadline_expired_running, 0);
    eprintln!("queued deadline of 200 ms answered after {took:?}");
    for b in blockers {
        assert_eq!(b.await.unwrap().unwrap().into_inner().token_ids.len(), 1500);
    }
    let after = gen.generate_unary(long(4)).await.unwrap().into_inner();
    assert_eq!(after.token_ids.len(), 4);
    started.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_mid_generation_stops_it_and_frees_its_blocks() {
    let started = slow_model(4).start().await;
    let mut gen = started.gen.clone();
    let mut req = tonic::Request::new(long(4000));
    req.set_timeout(Duration::from_millis(300));
    let mut stream = gen.generate(req).await.unwrap().into_inner();
    let mut tokens = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(pb::generate_response::Event::Delta(d)) = m.event {
                    tokens += d.token_ids.len();
                }
            }
            Ok(None) => panic!("the stream ended without its deadline error"),
            Err(e) => break e,
        }
    };
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(
        tokens > 0 && tokens < 4000,
        "{tokens} tokens before the deadline"
    );
    let s = stats(&mut gen).await;
    assert_eq!(s.deadline_expired_running, 1);
    assert_eq!(s.running_sequences, 0);
    assert_eq!(s.kv_blocks_free, s.kv_blocks_total, "its blocks are free");
    let after = gen.generate_unary(long(4)).await.unwrap().into_inner();
    assert_eq!(after.token_ids.len(), 4);
    started.stop().await;
}

async fn health(channel: Channel) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_engine_loop_is_not_serving_within_a_second() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let options = ServerOptions {
        engine_stall_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let started = Started::serve(slow_model(4).service(), options).await;
    let channel = Channel::from_shared(started.server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let serving = ServingStatus::Serving as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(channel.clone()).await != serving {
        assert!(Instant::now() < deadline, "never SERVING after warm-up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = started.gen.clone();
    let busy = tokio::spawn(async move { c.generate_unary(long(1000)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    started
        .server
        .engine
        .inject_stall(Duration::from_millis(2000))
        .await
        .unwrap();
    let stalled_at = Instant::now();
    while health(channel.clone()).await == serving {
        assert!(
            stalled_at.elapsed() < Duration::from_secs(1),
            "still SERVING after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = stalled_at.elapsed();
    eprintln!("stall noticed after {noticed:?}");
    while health(channel.clone()).await != serving {
        assert!(
            stalled_at.elapsed() < Duration::from_secs(10),
            "never SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        busy.await.unwrap().unwrap().into_inner().token_ids.len(),
        1000
    );
    let mut gen = started.gen.clone();
    let after = gen.generate_unary(long(4)).await.unwrap().into_inner();
    assert_eq!(after.token_ids.len(), 4);
    started.stop().await;
}
