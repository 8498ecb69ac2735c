//! The load-testing harness (`multilora bench`, a gRPC client of the server): the
//! traffic model (`workload`: arrivals, adapter popularity, lengths), the runner that
//! drives a live server and records every request (`runner`), the reported metrics
//! (`metrics`: latency percentiles, throughput, goodput, errors, fairness) and the
//! end-of-run table (`report`).
pub mod cli;
pub mod metrics;
pub mod report;
pub mod runner;
pub mod workload;
