use super::*;
use crate::server::tenants::{key_digest, Tenant};
use std::time::Duration;

fn tenant(limits: &str) -> Arc<Tenant> {
    let text = format!(
        "[[tenant]]\nname = \"t\"\napi_key_sha256 = [\"{}\"]\nadapters = [\"*\"]\n{limits}",
        key_digest("k")
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    tenants.authenticate(Some(b"Bearer k")).unwrap()
}

fn admission(requests: usize, tokens: usize) -> Arc<Admission> {
    Arc::new(Admission::new(QueueBounds {
        max_waiting_requests: requests,
        max_waiting_tokens: tokens,
    }))
}

fn retry_ms(r: Result<Ticket, RequestError>) -> u64 {
    match r {
        Err(RequestError::Overloaded { retry_after_ms, .. }) => retry_after_ms,
        other => panic!("not an overload refusal: {other:?}"),
    }
}

#[test]
fn the_queue_never_passes_its_bounds_and_frees_places_as_requests_start() {
    let a = admission(3, 100);
    let t = tenant("");
    let mut held: Vec<Ticket> = (0..3).map(|_| a.admit(&t, 10).unwrap()).collect();
    assert_eq!(a.waiting(), (3, 30));
    assert!(retry_ms(a.admit(&t, 10)) > 0);
    assert_eq!(a.waiting(), (3, 30));
    held[0].started();
    held[0].started();
    assert_eq!(a.waiting(), (2, 20));
    let big = a.admit(&t, 81);
    assert!(retry_ms(big) > 0, "tokens over the bound");
    let fits = a.admit(&t, 80).unwrap();
    assert_eq!(a.waiting(), (3, 100));
    drop(fits);
    drop(held);
    assert_eq!(a.waiting(), (0, 0));
    // Alone, one request is admitted whatever its length.
    let long = a.admit(&t, 1_000).unwrap();
    assert_eq!(a.waiting(), (1, 1_000));
    drop(long);
    let u = t.gate.usage();
    assert_eq!((u.requests, u.refused, u.in_flight), (5, 2, 0));
}

#[test]
fn a_tenant_at_its_concurrency_limit_is_refused_until_one_ends() {
    let a = admission(100, 10_000);
    let t = tenant("max_concurrent_requests = 2");
    let one = a.admit(&t, 1).unwrap();
    let mut two = a.admit(&t, 1).unwrap();
    two.started();
    assert_eq!(retry_ms(a.admit(&t, 1)), BUSY_RETRY_MS);
    assert_eq!(a.waiting(), (1, 1), "the refused one took no place");
    drop(one);
    let _three = a.admit(&t, 1).unwrap();
    assert_eq!(t.gate.usage().in_flight, 2);
}

#[test]
fn rates_refill_over_time_and_say_when_to_retry() {
    let t = tenant("requests_per_minute = 2\ntokens_per_minute = 600");
    let g = &t.gate;
    let t0 = Instant::now();
    g.take(100, t0).unwrap();
    g.take(100, t0).unwrap();
    // Two requests a minute: the third waits for one credit, 30 s.
    let e = g.take(1, t0).unwrap_err();
    assert_eq!(e.retry_after_ms(), Some(30_000));
    g.take(1, t0 + Duration::from_secs(30)).unwrap();
    // Tokens: 600 a minute (10 a second); full again at 30 s, 1 spent, then 1,500
    // generated: 901 in debt; 30 s later 601 in debt, so 60.2 s until one is back.
    g.charge_completion(1_500);
    let later = t0 + Duration::from_secs(60);
    let e = g.take(1, later).unwrap_err();
    assert!(e.to_string().contains("tokens per minute"), "{e}");
    let wait = e.retry_after_ms().unwrap();
    assert_eq!(wait, 60_200);
    g.take(1, later + Duration::from_millis(wait)).unwrap();
    assert_eq!(g.usage().in_flight, 4);
}
