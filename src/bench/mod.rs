//! The load-testing harness (`multilora bench`, a gRPC client of the server): the
//! traffic model (`workload`: arrivals, adapter popularity, lengths) and the reported
//! metrics (`metrics`: latency percentiles, throughput, goodput, errors, fairness).
//! The runner that drives a live server with them is the next step.
pub mod metrics;
pub mod workload;
