//! Times prefill and single-token decode steps of a GGUF model on the CPU:
//! `cargo run --release -p tokenmill-models --example step_time [-- MODEL.gguf]`.
//!
//! Each figure is the median over its steps (prefill: over 3 runs), so a
//! neighbour's burst of work on a shared machine moves it little.
use candle_core::Device;
use std::time::Instant;
use tokenmill_models::{catalog, ForwardBatch, LoadedModel, LogitRows, PagedKvCache};

/// Milliseconds of the median of `steps` calls of `step(i)`.
fn median_ms(
    steps: usize,
    mut step: impl FnMut(usize) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps {
        let t = Instant::now();
        step(i)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => catalog::find("smollm2").ok_or("unknown model")?.path(),
    };
    let loaded = LoadedModel::from_gguf_file(&path, &Device::Cpu, |_, _| {})?;
    let model = &loaded.model;
    let cache = model.new_kv_cache(16, 64)?;
    let table: Vec<u32> = (0..64).collect();
    let prompt: Vec<u32> = (100..228).collect();
    let prefill = median_ms(3, |_| {
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, prompt.len(), table.clone(), LogitRows::Last);
        model.forward(&batch, &cache)?;
        Ok(())
    })?;
    println!("prefill {} tokens: {prefill:.1} ms", prompt.len());
    let per = median_ms(64, |i| {
        let mut batch = ForwardBatch::default();
        batch.push(
            &[300 + i as u32],
            prompt.len() + i + 1,
            table.clone(),
            LogitRows::Last,
        );
        model.forward(&batch, &cache)?;
        Ok(())
    })?;
    println!("decode: {per:.2} ms/token ({:.1} tokens/s)", 1e3 / per);
    // Batched decode: `b` sequences of 64 prompt tokens each, one token each
    // per step, as continuous batching runs them.
    for b in [1usize, 4, 16, 64] {
        let blocks_per_seq = 8;
        let cache: PagedKvCache = model.new_kv_cache(16, b * blocks_per_seq)?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let mut batch = ForwardBatch::default();
        for table in &tables {
            batch.push(&prompt[..64], 64, table.clone(), LogitRows::Last);
        }
        model.forward(&batch, &cache)?;
        let per = median_ms(16, |i| {
            let mut batch = ForwardBatch::default();
            for table in &tables {
                batch.push(
                    &[300 + i as u32],
                    64 + i + 1,
                    table.clone(),
                    LogitRows::Last,
                );
            }
            model.forward(&batch, &cache)?;
            Ok(())
        })?;
        println!(
            "batched decode x{b}: {per:.1} ms/step ({:.1} tokens/s)",
            b as f64 * 1e3 / per
        );
    }
    Ok(())
}
