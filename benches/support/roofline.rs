//! Machine rates measured in the same run as a benchmark: read bandwidth and f32 GEMM rate.
use rayon::prelude::*;
use std::time::{Duration, Instant};

pub fn median_time(iters: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Read bandwidth (bytes/s): a parallel sum over 512 MiB of f32.
#[allow(dead_code)]
pub fn read_bandwidth(iters: usize) -> f64 {
    let data = vec![1.0f32; 128 << 20];
    let t = median_time(iters, || {
        let s: f32 = data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for block in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += block[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
    });
    (data.len() * 4) as f64 / t.as_secs_f64()
}

/// f32 GEMM rate (FLOP/s) of candle's matmul on a large square-ish problem.
#[allow(dead_code)]
pub fn gemm_rate(iters: usize) -> f64 {
    use candle_core::{Device, Tensor};
    let (m, k, n) = (512, 1024, 1024);
    let a = Tensor::ones((m, k), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((n, k), candle_core::DType::F32, &Device::Cpu).unwrap();
    let t = median_time(iters, || {
        let _ = a.matmul(&b.t().unwrap()).unwrap();
    });
    2.0 * (m * k * n) as f64 / t.as_secs_f64()
}
