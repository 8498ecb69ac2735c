//! CPU linear kernels by weight format, on the default model's shapes: f32 panels (the
//! reference), bf16 panels, our quantized kernels (Q4_1, Q8_0, Q4_K) and candle's
//! `QMatMul` on the same quantized tensor, at 1, 4 and 32 tokens (Q4_K only where rows
//! are multiples of 256). Prints time per call
//! and each format's speed relative to f32 panels measured in the same run, with the
//! bytes each format reads per call. `cargo bench --bench cpu_linear`; under `cargo test`
//! one quick pass is a smoke test.
#[path = "support/roofline.rs"]
mod roofline;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use multilora::model::backend::cpu::linear::{PackedWeight, PanelType};
use multilora::model::backend::cpu::quant::QuantWeight;
use multilora::model::block_rows::BlockRows;
use multilora::rng::test_data as data;
use roofline::median_time;

/// `(out, in)`: SmolLM2-135M's q/o, k/v, gate/up and down projections and its LM head,
/// then the synthetic 1B's q/o, gate/up and down projections.
const SHAPES: [(usize, usize); 8] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
    (2048, 2048),
    (8192, 2048),
    (2048, 8192),
];

const QUANT: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K];

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let iters = if quick { 1 } else { 15 };
    let tokens: &[usize] = if quick { &[1, 5] } else { &[1, 4, 32] };
    let shapes: &[(usize, usize)] = if quick { &SHAPES[..1] } else { &SHAPES };
    println!(
        "threads {}  (time per call in microseconds; x = speed relative to f32 panels)",
        rayon::current_num_threads()
    );
    println!(
        "{:>12} {:>6} {:>10} {:>12} {:>10} {:>8}",
        "shape", "tokens", "format", "MB read", "us", "x f32"
    );
    for &(out, inp) in shapes {
        let w = data(out * inp, 1);
        let wt = Tensor::from_slice(&w, (out, inp), &Device::Cpu).expect("weight tensor");
        let f32_panels = PackedWeight::pack_as(&w, out, inp, PanelType::F32);
        let bf16_panels = PackedWeight::pack_as(&w, out, inp, PanelType::Bf16);
        for &t in tokens {
            let x = data(t * inp, 2);
            let xt = Tensor::from_slice(&x, (t, inp), &Device::Cpu).expect("input tensor");
            let time = |f: &mut dyn FnMut()| median_time(iters, f).as_secs_f64() * 1e6;
            let base = time(&mut || {
                std::hint::black_box(f32_panels.matmul(&x, t));
            });
            let row = |name: &str, bytes: usize, us: f64| {
                println!(
                    "{:>12} {:>6} {:>10} {:>12.2} {:>10.1} {:>8.2}",
                    format!("{out}x{inp}"),
                    t,
                    name,
                    bytes as f64 / 1e6,
                    us,
                    base / us
                );
            };
            row("f32", f32_panels.bytes(), base);
            let us = time(&mut || {
                std::hint::black_box(bf16_panels.matmul(&x, t));
            });
            row("bf16", bf16_panels.bytes(), us);
            for dtype in QUANT {
                if inp % dtype.block_size() != 0 {
                    continue; // k-quants need rows of whole 256-value blocks
                }
                let rows = BlockRows::quantize(&wt, dtype).expect("quantize");
                let ours = QuantWeight::from_block_rows(&rows)
                    .expect("repack")
                    .expect("a type the kernels compute on");
                let us = time(&mut || {
                    std::hint::black_box(ours.matmul(&x, t));
                });
                row(&format!("{dtype:?}"), ours.bytes(), us);
                let qt = QTensor::quantize(&wt, dtype).expect("candle quantize");
                let bytes = qt.storage_size_in_bytes();
                let candle = QMatMul::from_qtensor(qt).expect("QMatMul");
                let us = time(&mut || {
                    std::hint::black_box(candle.forward(&xt).expect("candle forward"));
                });
                row(&format!("candle {dtype:?}"), bytes, us);
            }
        }
    }
}
