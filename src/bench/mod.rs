//! The load-testing harness (`multilora bench`, a gRPC client of the server): the
//! traffic model (`workload`: arrivals, adapter popularity, lengths), the runner that
//! drives a live server and records every request (`runner`), the reported metrics
//! (`metrics`: latency percentiles, throughput, goodput, errors, fairness), the typed
//! JSON report and the end-of-run table (`report`), adapter churn beside the traffic
//! (`churn`) and SVG plots (`plot`), and the table and plots of a sweep of runs
//! (`sweep`).
pub mod churn;
pub mod cli;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod runner;
pub mod sweep;
pub mod workload;
