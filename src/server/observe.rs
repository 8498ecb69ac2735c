//! Request metrics of both fronts (gRPC and HTTP): every request's outcome by protocol
//! and status code, and its latencies (time to first token from arrival at the front,
//! the gap between output tokens, end to end), recorded as its engine events pass
//! through [`ObservedEvents`] on their way to the client.
//! Invariants: each request is counted exactly once: as rejected ([`ServerMetrics::rejected`],
//! before it reaches the engine), or when its stream ends (finished, failed, or dropped by
//! a client that went away, counted as `cancelled` when the receiver is dropped).
use super::admission::Ticket;
use crate::engine::sequence::{FinishReason, SeqEvent};
use crate::error::RequestError;
use crate::metrics::{Histogram, TextWriter, LATENCY_BUCKETS, TOKEN_GAP_BUCKETS};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// The front a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Grpc,
    Http,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }

    /// The status a successfully answered request gets.
    fn ok_code(self) -> &'static str {
        match self {
            Self::Grpc => "OK",
            Self::Http => "200",
        }
    }

    /// The status of a request whose client went away (nginx's 499 for HTTP).
    fn gone_code(self) -> &'static str {
        match self {
            Self::Grpc => "CANCELLED",
            Self::Http => "499",
        }
    }

    fn error_code(self, e: &RequestError) -> String {
        match self {
            Self::Grpc => e.grpc_code_name().to_string(),
            Self::Http => e.http_status().to_string(),
        }
    }
}

/// (protocol, outcome, code) -> requests.
type Outcomes = BTreeMap<(Protocol, &'static str, String), u64>;

/// Counters and histograms of the requests both fronts served.
pub struct ServerMetrics {
    outcomes: Mutex<Outcomes>,
    ttft: Histogram,
    token_gap: Histogram,
    e2e: Histogram,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            outcomes: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(LATENCY_BUCKETS),
            token_gap: Histogram::new(TOKEN_GAP_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
        FinishReason::Cancelled => "cancelled",
    }
}

impl ServerMetrics {
    fn count(&self, protocol: Protocol, outcome: &'static str, code: String) {
        let mut m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((protocol, outcome, code)).or_insert(0) += 1;
    }

    /// A request refused before it reached the engine.
    pub fn rejected(&self, protocol: Protocol, e: &RequestError) {
        self.count(protocol, "error", protocol.error_code(e));
    }

    /// Wraps a started request's events so they are measured as they are read; its
    /// admission ticket (if any) leaves the waiting queue at the first event, is charged
    /// the generated tokens at the end (those read so far if the request fails or its
    /// reader goes), and is given back when the events drop.
    pub fn observe(
        self: &Arc<Self>,
        protocol: Protocol,
        arrived: Instant,
        rx: mpsc::UnboundedReceiver<SeqEvent>,
        ticket: Option<Ticket>,
    ) -> ObservedEvents {
        ObservedEvents {
            rx,
            ticket,
            metrics: self.clone(),
            protocol,
            arrived,
            last_token: None,
            tokens_read: 0,
            ended: false,
        }
    }

    /// Writes the `multilora_requests_total` counter and the latency histograms.
    pub fn write(&self, w: &mut TextWriter) {
        let outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let samples: Vec<([(&str, &str); 3], f64)> = outcomes
            .iter()
            .map(|((p, outcome, code), n)| {
                let labels = [
                    ("protocol", p.name()),
                    ("outcome", *outcome),
                    ("code", code.as_str()),
                ];
                (labels, *n as f64)
            })
            .collect();
        let samples: Vec<_> = samples.iter().map(|(l, n)| (&l[..], *n)).collect();
        w.counter(
            "multilora_requests",
            "Requests answered, by front (grpc, http), outcome (stop, eos, length, \
             cancelled, error) and status code (gRPC code name or HTTP status).",
            &samples,
        );
        w.histogram(
            "multilora_time_to_first_token_seconds",
            "From a request's arrival at the front to its first output token.",
            &self.ttft.snapshot(),
        );
        w.histogram(
            "multilora_time_per_output_token_seconds",
            "The time between two consecutive output tokens of a request.",
            &self.token_gap.snapshot(),
        );
        w.histogram(
            "multilora_e2e_request_latency_seconds",
            "From a request's arrival at the front to its last event.",
            &self.e2e.snapshot(),
        );
    }
}

/// A started request's engine events, measured as the front reads them.
pub struct ObservedEvents {
    rx: mpsc::UnboundedReceiver<SeqEvent>,
    ticket: Option<Ticket>,
    metrics: Arc<ServerMetrics>,
    protocol: Protocol,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Token events read so far.
    tokens_read: usize,
    /// Whether the request's outcome is counted.
    ended: bool,
}

impl ObservedEvents {
    /// The next event (None: the engine dropped the sequence without a last event).
    pub async fn recv(&mut self) -> Option<SeqEvent> {
        let ev = self.rx.recv().await;
        let now = Instant::now();
        if matches!(ev, Some(SeqEvent::Token(_))) {
            self.tokens_read += 1;
        }
        if let Some(ticket) = &mut self.ticket {
            match &ev {
                Some(SeqEvent::Finished { usage, .. }) => ticket.finished(usage),
                Some(SeqEvent::Token(_)) => ticket.started(),
                Some(SeqEvent::Error(_)) | None => ticket.ended_early(self.tokens_read),
            }
        }
        let m = &self.metrics;
        match &ev {
            Some(SeqEvent::Token(_)) => {
                match self.last_token {
                    None => m.ttft.observe((now - self.arrived).as_secs_f64()),
                    Some(t) => m.token_gap.observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            Some(SeqEvent::Finished { reason, .. }) => {
                self.end(now, finish_name(*reason), self.protocol.ok_code().into());
            }
            Some(SeqEvent::Error(e)) => {
                self.end(now, "error", self.protocol.error_code(e));
            }
            None => {
                let code = self
                    .protocol
                    .error_code(&RequestError::Internal(String::new()));
                self.end(now, "error", code);
            }
        }
        ev
    }

    fn end(&mut self, now: Instant, outcome: &'static str, code: String) {
        if !self.ended {
            self.ended = true;
            self.metrics.e2e.observe((now - self.arrived).as_secs_f64());
            self.metrics.count(self.protocol, outcome, code);
        }
    }
}

impl Drop for ObservedEvents {
    fn drop(&mut self) {
        if let Some(ticket) = &mut self.ticket {
            ticket.ended_early(self.tokens_read);
        }
        let code = self.protocol.gone_code().to_string();
        self.end(Instant::now(), "cancelled", code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sequence::Usage;

    #[tokio::test]
    async fn each_request_is_counted_once_by_how_it_ended() {
        let m = Arc::new(ServerMetrics::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let mut ev = m.observe(Protocol::Http, Instant::now(), rx, None);
        tx.send(SeqEvent::Finished {
            reason: FinishReason::Length,
            usage: Usage::default(),
            matched_stop: None,
        })
        .unwrap();
        assert!(ev.recv().await.is_some());
        drop(ev);
        let (_tx, rx) = mpsc::unbounded_channel();
        drop(m.observe(Protocol::Grpc, Instant::now(), rx, None));
        m.rejected(Protocol::Grpc, &RequestError::NotFound("x".into()));
        let mut w = TextWriter::default();
        m.write(&mut w);
        let text = w.finish();
        for line in [
            r#"multilora_requests_total{protocol="grpc",outcome="cancelled",code="CANCELLED"} 1"#,
            r#"multilora_requests_total{protocol="grpc",outcome="error",code="NOT_FOUND"} 1"#,
            r#"multilora_requests_total{protocol="http",outcome="length",code="200"} 1"#,
            "multilora_e2e_request_latency_seconds_count 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    fn token() -> SeqEvent {
        SeqEvent::Token(crate::engine::sequence::TokenEvent {
            token_id: 1,
            text: "x".into(),
            logprob: None,
        })
    }

    #[tokio::test]
    async fn tokens_of_a_request_that_fails_or_is_dropped_are_charged_to_its_tenant() {
        use crate::server::admission::{Admission, QueueBounds};
        use crate::server::tenants::{key_digest, Tenants};
        let text = format!(
            "[[tenant]]\nname = \"t\"\napi_key_sha256 = [\"{}\"]\nadapters = [\"*\"]\n\
             tokens_per_minute = 1000\n",
            key_digest("k")
        );
        let tenant = Tenants::from_toml(&text)
            .unwrap()
            .authenticate(Some(b"Bearer k"))
            .unwrap();
        let admission = Arc::new(Admission::new(QueueBounds {
            max_waiting_requests: 8,
            max_waiting_tokens: 1_000,
        }));
        let m = Arc::new(ServerMetrics::default());
        // Three tokens, then a deadline: the three are charged.
        let (tx, rx) = mpsc::unbounded_channel();
        let ticket = admission.admit(&tenant, 10).unwrap();
        let mut ev = m.observe(Protocol::Grpc, Instant::now(), rx, Some(ticket));
        for _ in 0..3 {
            tx.send(token()).unwrap();
        }
        tx.send(SeqEvent::Error(RequestError::DeadlineExceeded(
            "late".into(),
        )))
        .unwrap();
        for _ in 0..4 {
            ev.recv().await.unwrap();
        }
        drop(ev);
        assert_eq!(tenant.gate.usage().completion_tokens, 3);
        // Two tokens read, then the reader goes (the client disconnected): two more.
        let (tx, rx) = mpsc::unbounded_channel();
        let ticket = admission.admit(&tenant, 10).unwrap();
        let mut ev = m.observe(Protocol::Grpc, Instant::now(), rx, Some(ticket));
        tx.send(token()).unwrap();
        tx.send(token()).unwrap();
        ev.recv().await.unwrap();
        ev.recv().await.unwrap();
        drop(ev);
        // A finished request is charged its usage once, not again when dropped.
        let (tx, rx) = mpsc::unbounded_channel();
        let ticket = admission.admit(&tenant, 10).unwrap();
        let mut ev = m.observe(Protocol::Grpc, Instant::now(), rx, Some(ticket));
        tx.send(token()).unwrap();
        tx.send(SeqEvent::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                completion_tokens: 1,
                ..Usage::default()
            },
            matched_stop: None,
        })
        .unwrap();
        ev.recv().await.unwrap();
        ev.recv().await.unwrap();
        drop(ev);
        let usage = tenant.gate.usage();
        assert_eq!((usage.completion_tokens, usage.in_flight), (6, 0));
    }
}
