use multilora::model::packed_linear::PackedWeight;
use std::time::Instant;
fn main() {
    for &(t, inp, out) in &[
        (32usize, 576usize, 3072usize),
        (32, 1536, 576),
        (1, 576, 3072),
        (64, 576, 3072),
        (30, 576, 3072),
        (36, 576, 3072),
    ] {
        let w: Vec<f32> = (0..out * inp).map(|i| (i % 7) as f32 * 0.1).collect();
        let x: Vec<f32> = (0..t * inp).map(|i| (i % 5) as f32 * 0.1).collect();
        let ps: Vec<PackedWeight> = (0..30).map(|_| PackedWeight::pack(&w, out, inp)).collect();
        let fl = 2.0 * (t * inp * out) as f64;
        for p in &ps {
            std::hint::black_box(p.matmul(&x, t));
        }
        let n = 60;
        let s = Instant::now();
        for k in 0..n {
            std::hint::black_box(ps[k % 30].matmul(&x, t));
        }
        let cold = s.elapsed().as_secs_f64() / n as f64;
        let s = Instant::now();
        for _ in 0..n {
            std::hint::black_box(ps[0].matmul(&x, t));
        }
        let hot = s.elapsed().as_secs_f64() / n as f64;
        println!("T={t:3} in={inp:5} out={out:5}  cold {:.3} ms {:6.1} GFLOP/s   hot {:.3} ms {:6.1} GFLOP/s", cold*1e3, fl/cold/1e9, hot*1e3, fl/hot/1e9);
    }
}
