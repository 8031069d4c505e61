//! Times one linear layer at several batch sizes: candle's Q8_0 `QMatMul`,
//! candle's f32 matmul, and our int8 kernel (`cpu_gemm`) on the same weight
//! requantized (`ours`, symmetric) and in Q4_1 (`ours-q4_1`, the offset
//! format the model's Q4_1 layers run in):
//! `cargo run -q -p tokenmill-models --example qmm_bench`.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;
use tokenmill_models::cpu::gemm::Q8Matrix;

/// Seconds of the fastest of `reps` calls of `f` after one warm-up: the
/// fastest call is the one least disturbed by whatever else shares the CPU.
fn time(reps: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (k, n) in [(576usize, 1536usize), (576, 960), (1536, 576), (576, 49152)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        let ours = Q8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, n, k)?;
        let q4_1 = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let ours_q4_1 = Q8Matrix::from_q4_1(&q4_1.data()?, n, k)?;
        let reps = if n > 10_000 { 4 } else { 20 };
        for m in [1usize, 4, 16, 64, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let macs = (m * k * n) as f64;
            let rate = |s: f64| format!("{:.3} ms ({:.1} GMAC/s)", s * 1e3, macs / s / 1e9);
            let s_q8 = time(reps, || q.forward(&x).map(drop))?;
            let s_f32 = if n > 10_000 {
                f64::NAN
            } else {
                time(reps, || x.matmul(&w.t()?).map(drop))?
            };
            let s_ours = time(reps, || x.apply_op1_no_bwd(&ours).map(drop))?;
            let s_q4_1 = time(reps, || x.apply_op1_no_bwd(&ours_q4_1).map(drop))?;
            println!(
                "k{k} n{n} m{m}: q8 {}  f32 {}  ours {}  ours-q4_1 {}",
                rate(s_q8),
                rate(s_f32),
                rate(s_ours),
                rate(s_q4_1)
            );
        }
    }
    Ok(())
}
