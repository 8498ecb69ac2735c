use candle_core::{Device, Tensor};
use std::time::Instant;
fn time(name: &str, flops: f64, n: usize, mut f: impl FnMut(usize)) {
    for i in 0..n {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:40} {:8.3} ms {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}
fn main() {
    let d = Device::Cpu;
    for &(t, k, n) in &[
        (32usize, 576usize, 3072usize),
        (32, 1536, 576),
        (64, 576, 3072),
    ] {
        let x = Tensor::randn(0f32, 1.0, (t, k), &d).unwrap();
        let ws: Vec<Tensor> = (0..40)
            .map(|_| Tensor::randn(0f32, 1.0, (n, k), &d).unwrap())
            .collect();
        let fl = 2.0 * (t * k * n) as f64;
        println!("-- T={t} in={k} out={n} (cold weights, 40 copies)");
        time("x @ w.t() (strided)", fl, 40, |i| {
            let _ = x.matmul(&ws[i].t().unwrap()).unwrap();
        });
        time("w @ x.t() -> [out,T]", fl, 40, |i| {
            let _ = ws[i].matmul(&x.t().unwrap()).unwrap();
        });
        let xt = x.t().unwrap().contiguous().unwrap();
        time("w @ xt(contig) -> [out,T]", fl, 40, |i| {
            let _ = ws[i].matmul(&xt).unwrap();
        });
        time("hot: w @ x.t()", fl, 40, |_| {
            let _ = ws[0].matmul(&x.t().unwrap()).unwrap();
        });
    }
}
