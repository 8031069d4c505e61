//! The one layer code, through our CPU kernels (the production forward)
//! and through the CUDA kernels' CPU references (the layer code a GPU
//! runs), against an independent second opinion: the forward through
//! candle's ops alone ([`super::candle_ops`]), which shares only the
//! weights' products with them. Prompts in one chunk and in two, a mixed
//! step (one sequence decoding while another prefills over its cached
//! blocks), then decode steps, both as they are and, through the
//! references, padded as a CUDA graph replays them (8 rows, tables as wide
//! as the context, the decode split planned for the context class).
//!
//! On tiny Llama, Llama 3, Qwen2 and Mistral models with random f32 weights
//! the logits must agree to 1e-4 of the largest. On the real SmolLM2 (Q4_1,
//! whose CPU matmul rounds activations to 8 bits, so that a last-bit
//! difference in a norm can move a rounding step) the greedy tokens must
//! agree wherever candle's top two logits are 0.5 or more apart.

use super::batch::{ForwardBatch, LogitRows};
use super::kv_cache::PagedKvCache;
use super::llama::{argmax, Llama};
use super::step_kernels::reference::{ReferenceKernels, ReferenceMeta};
use super::{candle_ops, ForwardOptions, ForwardPath};
use crate::error::{ModelError, Result};
use crate::{catalog, LoadedModel};
use candle_core::{DType, Device, Tensor};
use std::sync::OnceLock;
use tokenmill_kernels::geometry::graph_context_class;

fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = catalog::find("smollm2")
            .expect("smollm2 is a known model")
            .path();
        assert!(
            path.exists(),
            "{} is missing: run models/fetch-smollm2.sh",
            path.display()
        );
        LoadedModel::from_gguf_file(&path, &Device::Cpu, |_, _| {}).expect("model loads")
    })
}

impl Llama {
    /// [`Llama::forward`] as the GPU runs it, with the references as kernels.
    fn forward_through_references(
        &self,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        batch.validate(
            cache.block_size(),
            cache.num_blocks(),
            self.cfg.context_length,
        )?;
        self.forward_with(&ReferenceKernels, batch, cache)
    }

    /// A decode step as a CUDA graph of `graph_batch` rows replays it (see
    /// `cuda_graphs`): the logits of every padded row.
    fn decode_as_graph_through_references(
        &self,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        graph_batch: usize,
    ) -> Result<Tensor> {
        let meta = batch.paged_meta(cache.block_size(), cache.num_blocks())?;
        let class = graph_context_class(meta.max_context, self.cfg.context_length);
        let table_width = self.cfg.context_length.div_ceil(meta.block_size);
        let padded = meta
            .padded_decode(graph_batch, table_width)
            .map_err(|e| ModelError::InvalidBatch(e.to_string()))?;
        let mut tokens = batch.tokens.clone();
        tokens.resize(graph_batch, 0);
        let tokens = Tensor::new(tokens.as_slice(), self.device())?;
        let meta = ReferenceMeta {
            meta: padded,
            context_capacity: Some(class),
        };
        let normed = self.kernel_layers(&ReferenceKernels, &tokens, &meta, cache)?;
        self.lm_head.forward(&normed)
    }
}

/// How two sets of logit rows must agree.
#[derive(Clone, Copy)]
enum Agreement {
    /// Every logit within this fraction of the largest.
    Relative(f32),
    /// The same top-1 token in every row whose top two are this far apart.
    Greedy(f32),
}

fn assert_agree(got: &Tensor, want: &Tensor, agreement: Agreement, what: &str) {
    match agreement {
        Agreement::Relative(bound) => {
            let difference = relative_difference(got, want);
            assert!(difference < bound, "{what}: {difference}");
        }
        Agreement::Greedy(margin) => {
            for r in 0..want.dim(0).unwrap() {
                let row = want.get(r).unwrap().to_vec1::<f32>().unwrap();
                let mut sorted = row.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] < margin {
                    continue;
                }
                let (g, w) = (
                    argmax(&got.get(r).unwrap()).unwrap(),
                    argmax(&want.get(r).unwrap()).unwrap(),
                );
                assert_eq!(g, w, "{what}, row {r}");
            }
        }
    }
}

/// Largest difference relative to the largest logit.
fn relative_difference(got: &Tensor, want: &Tensor) -> f32 {
    let (got, want) = (
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst.is_finite(), "a NaN or inf in the logits");
    worst / scale
}

/// Token ids spread over the vocabulary.
fn prompt(len: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729) % (vocab - 1) + 1) as u32)
        .collect()
}

/// A tiny model of `arch` (tests/data) with seeded random f32 weights.
fn tiny(arch: &str) -> Llama {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("tiny-{arch}"));
    let cfg = crate::load::hf::read_config(&dir).unwrap();
    let mut weights = crate::load::random_weights::RandomWeights::new(&cfg, 7, DType::F32);
    Llama::from_dense(cfg, &mut weights, &Device::Cpu, |_, _| {}).unwrap()
}

#[test]
fn the_kernel_forward_gives_candles_logits_on_random_models() {
    for arch in ["llama", "llama3", "qwen2", "mistral"] {
        compare_forwards(&tiny(arch), Agreement::Relative(1e-4));
    }
}

#[test]
fn the_kernel_forward_gives_candles_tokens_on_smollm2() {
    compare_forwards(&smollm2().model, Agreement::Greedy(0.5));
}

#[test]
fn the_options_choose_the_forward() {
    let mut llama = tiny("qwen2");
    assert_eq!(llama.forward_options(), ForwardOptions::default());
    let mut batch = ForwardBatch::default();
    batch.push(&prompt(5, 0, 64), 5, vec![2], LogitRows::All);
    let kernels = llama
        .forward(&batch, &llama.new_kv_cache(16, 4).unwrap())
        .unwrap();
    let candle = candle_ops::forward(&llama, &batch, &llama.new_kv_cache(16, 4).unwrap()).unwrap();
    let options = ForwardOptions {
        path: ForwardPath::CandleOps,
        cuda_graphs: false,
    };
    llama.set_forward_options(options).unwrap();
    assert_eq!(llama.forward_options(), options);
    let chosen = llama
        .forward(&batch, &llama.new_kv_cache(16, 4).unwrap())
        .unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(&chosen), bits(&candle));
    assert!(relative_difference(&kernels, &candle) < 1e-4);
}

fn compare_forwards(llama: &Llama, agreement: Agreement) {
    let vocab = llama.config().vocab_size;
    let caches: Vec<PagedKvCache> = (0..4)
        .map(|_| llama.new_kv_cache(16, 12).unwrap())
        .collect();
    let (candle, cpu, references, graph) = (&caches[0], &caches[1], &caches[2], &caches[3]);
    let tables = [vec![5u32, 0, 3], vec![1, 4, 2]];
    let (first, second) = (prompt(21, 0, vocab), prompt(16, 1, vocab));
    // Each forward against candle's.
    let check = |batch: &ForwardBatch, what: &str| -> Tensor {
        let want = candle_ops::forward(llama, batch, candle).unwrap();
        let got = llama.forward(batch, cpu).unwrap();
        assert_agree(&got, &want, agreement, &format!("CPU kernels, {what}"));
        let got = llama.forward_through_references(batch, references).unwrap();
        assert_agree(&got, &want, agreement, &format!("references, {what}"));
        want
    };

    // 1: the first prompt whole, the first 9 tokens of the second.
    let mut batch = ForwardBatch::default();
    batch.push(&first, 21, tables[0].clone(), LogitRows::All);
    batch.push(&second[..9], 9, tables[1].clone(), LogitRows::All);
    // 2: the first sequence decodes while the second prefills its last 7
    // tokens over its cached blocks.
    let mut steps = vec![batch];
    let mut batch = ForwardBatch::default();
    batch.push(&[first[3]], 22, tables[0].clone(), LogitRows::Last);
    batch.push(&second[9..], 16, tables[1].clone(), LogitRows::Last);
    steps.push(batch);

    let mut last = Vec::new();
    for (step, batch) in steps.iter().enumerate() {
        let want = check(batch, &format!("step {step}"));
        llama.forward_through_references(batch, graph).unwrap();
        last = (0..2)
            .map(|r| argmax(&want.get(want.dim(0).unwrap() - 2 + r).unwrap()).unwrap())
            .collect();
    }

    // Decode steps, greedy on candle's logits.
    let mut contexts = [22usize, 16];
    for step in 0..4 {
        let mut batch = ForwardBatch::default();
        for s in 0..2 {
            contexts[s] += 1;
            batch.push(&[last[s]], contexts[s], tables[s].clone(), LogitRows::Last);
        }
        let want = check(&batch, &format!("decode step {step}"));
        let padded = llama
            .decode_as_graph_through_references(&batch, graph, 8)
            .unwrap();
        let real_rows = padded.narrow(0, 0, 2).unwrap();
        assert_agree(
            &real_rows,
            &want,
            agreement,
            &format!("graph decode step {step}"),
        );
        last = (0..2)
            .map(|r| argmax(&want.get(r).unwrap()).unwrap())
            .collect();
    }
}
