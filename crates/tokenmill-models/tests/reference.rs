//! Our SmolLM2 against llama.cpp: tokenization, chat template, greedy
//! continuations and teacher-forced top-1 tokens, from the reference data in
//! `tests/fixtures/smollm2_reference.json` (made by
//! `models/reference/make_reference.py` with llama-cpp-python).
//!
//! The real model must be installed (`models/fetch-smollm2.sh`).

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::sync::OnceLock;
use tokenmill_models::{
    catalog, ForwardBatch, LoadedModel, LogitRows, PagedKvCache, TemplateMessage,
};

/// Margin (top-1 minus top-2 logit) under which two correct implementations
/// may pick different tokens: quantized matmuls round activations to 8 bits.
const CLOSE_MARGIN: f64 = 0.5;
const BLOCK_SIZE: usize = 16;

fn model() -> &'static LoadedModel {
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

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/smollm2_reference.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference data")).expect("json")
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

/// One sequence fed through the paged forward, a chunk at a time, with its
/// blocks taken in a scattered order so block-table indexing is exercised.
struct Session {
    cache: PagedKvCache,
    blocks: Vec<u32>,
    len: usize,
}

impl Session {
    fn new(max_tokens: usize) -> Self {
        let num_blocks = max_tokens.div_ceil(BLOCK_SIZE) + 1;
        let cache = model().model.new_kv_cache(BLOCK_SIZE, num_blocks).unwrap();
        // Blocks in reverse order: the table, not the layout, says where.
        let blocks = (0..num_blocks as u32).rev().collect();
        Session {
            cache,
            blocks,
            len: 0,
        }
    }

    /// Feeds `tokens`; returns the logits of every one of them.
    fn feed(&mut self, tokens: &[u32], rows: LogitRows) -> Vec<Vec<f32>> {
        self.len += tokens.len();
        let mut batch = ForwardBatch::default();
        batch.push(tokens, self.len, self.blocks.clone(), rows);
        let logits: Tensor = model().model.forward(&batch, &self.cache).unwrap();
        logits.to_vec2().unwrap()
    }
}

/// The first index of the largest value.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn tokenization_matches_llama_cpp() {
    let tokenizer = &model().tokenizer;
    let cases = reference()["tokenization"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "tokenizing {text:?}"
        );
        // And back: decoding gives the text (control tokens are left out of
        // output, so only check strings without them).
        if !text.contains("<|") {
            assert_eq!(tokenizer.decode(&ids(&case["ids"])).unwrap(), text);
        }
    }
}

#[test]
fn prompts_tokenize_and_chat_template_renders_like_llama_cpp() {
    for prompt in reference()["prompts"].as_array().unwrap() {
        let text = prompt["text"].as_str().unwrap();
        if let Some(messages) = prompt.get("chat_messages") {
            let messages: Vec<TemplateMessage<'_>> = messages
                .as_array()
                .unwrap()
                .iter()
                .map(|m| TemplateMessage {
                    role: m["role"].as_str().unwrap(),
                    content: m["content"].as_str().unwrap(),
                })
                .collect();
            assert_eq!(model().chat_template.render(&messages).unwrap(), text);
        }
        assert_eq!(
            model().tokenizer.encode(text).unwrap(),
            ids(&prompt["prompt_ids"]),
            "prompt {}",
            prompt["name"]
        );
    }
}

#[test]
fn greedy_continuations_match_llama_cpp_until_a_close_call() {
    let mut report = Vec::new();
    for prompt in reference()["prompts"].as_array().unwrap() {
        let name = prompt["name"].as_str().unwrap();
        let prompt_ids = ids(&prompt["prompt_ids"]);
        let expected = ids(&prompt["continuation_ids"]);
        let margins = floats(&prompt["margins"]);
        let mut session = Session::new(prompt_ids.len() + 40);
        let mut row = session.feed(&prompt_ids, LogitRows::Last).pop().unwrap();
        let mut ours = Vec::new();
        for _ in 0..margins.len() {
            let next = argmax(&row);
            if model().tokenizer.is_end_of_generation(next) {
                break;
            }
            ours.push(next);
            row = session.feed(&[next], LogitRows::Last).pop().unwrap();
        }
        // Steps up to (and including) the first close call must agree.
        let sure = margins
            .iter()
            .position(|m| *m < CLOSE_MARGIN)
            .unwrap_or(margins.len());
        let must_agree = sure.min(expected.len());
        assert_eq!(
            ours[..must_agree.min(ours.len())],
            expected[..must_agree],
            "{name}: greedy tokens before step {sure} (margin >= {CLOSE_MARGIN})"
        );
        if prompt["stopped_by_eog"].as_bool() == Some(true) && sure == margins.len() {
            assert_eq!(
                ours, expected,
                "{name}: stops at the same end-of-generation token"
            );
        }
        let identical = ours
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| a == b)
            .count();
        report.push(format!(
            "{name}: {identical}/{} identical, first close step {sure}",
            expected.len()
        ));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn teacher_forced_top1_matches_llama_cpp_where_the_margin_is_clear() {
    let (mut checked, mut agreed_all) = (0, 0);
    for prompt in reference()["prompts"].as_array().unwrap() {
        let name = prompt["name"].as_str().unwrap();
        let prompt_ids = ids(&prompt["prompt_ids"]);
        let continuation = ids(&prompt["continuation_ids"]);
        let margins = floats(&prompt["margins"]);
        let top1 = floats(&prompt["top1_logits"]);
        let mut session = Session::new(prompt_ids.len() + 40);
        let mut row = session.feed(&prompt_ids, LogitRows::Last).pop().unwrap();
        for (step, margin) in margins.iter().enumerate() {
            let ours = argmax(&row);
            // The reference's choice at this step: its continuation token, or
            // its end-of-generation token after the last one.
            let theirs = continuation
                .get(step)
                .copied()
                .or_else(|| prompt["eog_id"].as_u64().map(|x| x as u32));
            if *margin >= CLOSE_MARGIN {
                checked += 1;
                assert_eq!(Some(ours), theirs, "{name} step {step}: margin {margin}");
                let logit_gap = (row[ours as usize] as f64 - top1[step]).abs();
                assert!(
                    logit_gap < 1.0,
                    "{name} step {step}: top-1 logit off by {logit_gap}"
                );
            }
            if Some(ours) == theirs {
                agreed_all += 1;
            }
            match continuation.get(step) {
                Some(next) => row = session.feed(&[*next], LogitRows::Last).pop().unwrap(),
                None => break,
            }
        }
    }
    let total: usize = reference()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["margins"].as_array().unwrap().len())
        .sum();
    println!(
        "teacher-forced: {checked} clear steps all agree; {agreed_all}/{total} steps agree overall"
    );
    assert!(checked > 200, "too few clear steps checked: {checked}");
}

#[test]
fn one_batch_of_many_sequences_equals_each_alone() {
    // Prefill chunks of three prompts plus a decode token, in one forward,
    // against each sequence run alone.
    let prompts: Vec<Vec<u32>> = reference()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|p| ids(&p["prompt_ids"]))
        .collect();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            Session::new(p.len() + 1)
                .feed(p, LogitRows::Last)
                .pop()
                .unwrap()
        })
        .collect();

    let total: usize = prompts.iter().map(|p| p.len() + BLOCK_SIZE).sum();
    let num_blocks = total.div_ceil(BLOCK_SIZE) + prompts.len();
    let cache = model().model.new_kv_cache(BLOCK_SIZE, num_blocks).unwrap();
    let mut next_block = 0u32;
    let mut batch = ForwardBatch::default();
    for p in &prompts {
        let n = p.len().div_ceil(BLOCK_SIZE) as u32;
        let table = (next_block..next_block + n).collect();
        next_block += n;
        batch.push(p, p.len(), table, LogitRows::Last);
    }
    let together: Vec<Vec<f32>> = model()
        .model
        .forward(&batch, &cache)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (a, b) in alone.iter().zip(&together) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "batched logits differ by {worst}");
        assert_eq!(argmax(a), argmax(b));
    }
}

#[test]
fn logits_are_bitwise_the_same_alone_batched_and_in_chunks() {
    // The engine relies on this: a sequence's greedy tokens must not depend
    // on what it is batched with, nor on how its prompt was chunked.
    let prompts: Vec<Vec<u32>> = reference()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|p| ids(&p["prompt_ids"]))
        .collect();
    let target = &prompts[0];
    let alone = Session::new(target.len())
        .feed(target, LogitRows::All)
        .into_iter()
        .map(|row| row.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        .collect::<Vec<_>>();

    // In chunks of 5 tokens.
    let mut session = Session::new(target.len());
    let mut chunked = Vec::new();
    for chunk in target.chunks(5) {
        chunked.extend(session.feed(chunk, LogitRows::All));
    }
    for (i, (a, b)) in alone.iter().zip(&chunked).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| *x == y.to_bits()),
            "token {i}: chunked prefill changed the logits"
        );
    }

    // Beside another prompt's prefill and a third sequence's decode token.
    let (other, decoding) = (&prompts[1], &prompts[2]);
    let tables = [0u32, 10, 20].map(|start| (start..start + 10).collect::<Vec<u32>>());
    let cache = model().model.new_kv_cache(BLOCK_SIZE, 30).unwrap();
    let mut warm = ForwardBatch::default();
    warm.push(
        &decoding[..decoding.len() - 1],
        decoding.len() - 1,
        tables[2].clone(),
        LogitRows::None,
    );
    model().model.forward(&warm, &cache).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(other, other.len(), tables[0].clone(), LogitRows::Last);
    batch.push(target, target.len(), tables[1].clone(), LogitRows::All);
    batch.push(
        &decoding[decoding.len() - 1..],
        decoding.len(),
        tables[2].clone(),
        LogitRows::Last,
    );
    let rows: Vec<Vec<f32>> = model()
        .model
        .forward(&batch, &cache)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, (a, b)) in alone.iter().zip(&rows[1..1 + target.len()]).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| *x == y.to_bits()),
            "token {i}: batching changed the logits"
        );
    }
}
