//! The scheduler on synthetic tokens: no model, no tokenizer. Every step
//! "draws" token 300, which ends nothing; the length limit ends sequences.

use super::*;
use std::time::SystemTime;

/// A token that is never an end-of-generation token here.
const DRAWN: u32 = 300;
/// The end-of-generation token of these requests.
const EOS: u32 = 2;

fn share(name: &str, weight: u32) -> Share {
    Share {
        tenant: TenantId(name.to_owned()),
        weight,
    }
}

fn request(key: u64, share: Share, prompt_len: usize, max_tokens: usize, n: usize) -> NewRequest {
    NewRequest {
        key: RequestKey(key),
        share,
        arrived_at: SystemTime::now(),
        prompt: (100..100 + prompt_len as u32).collect(),
        limits: TokenLimits {
            max_tokens,
            end_of_generation: vec![EOS],
        },
        sampling: vec![SamplingParamsRow::default(); n],
    }
}

fn anonymous(key: u64, prompt_len: usize, max_tokens: usize) -> NewRequest {
    request(key, share("anonymous", 1), prompt_len, max_tokens, 1)
}

/// Runs steps that always draw [`DRAWN`] until all finish; returns the
/// number of steps.
fn drive(s: &mut Scheduler) -> usize {
    drive_until(s, |_, _| false).len()
}

/// Runs steps as [`drive`] does until all finish or `stop` holds for a
/// step's plan; returns the tokens computed per tenant, step by step.
fn drive_until(
    s: &mut Scheduler,
    stop: impl Fn(&Scheduler, &SchedulerOutput) -> bool,
) -> Vec<Vec<(TenantId, usize)>> {
    let mut steps = Vec::new();
    while !s.is_idle() {
        let out = s.schedule();
        assert!(
            !out.is_empty(),
            "stalled with {:?} waiting/running",
            s.len()
        );
        assert!(out.num_tokens() <= s.config.max_batched_tokens);
        assert_eq!(out.sampling.len(), out.batch.logit_rows());
        let tokens = vec![DRAWN; out.sampling.len()];
        let updates = s.update_from_output(&out, &tokens);
        assert_eq!(updates.len(), out.chunks.len());
        steps.push(out.tenant_tokens.clone());
        assert!(steps.len() < 10_000);
        if stop(s, &out) {
            break;
        }
    }
    steps
}

/// Tenant "flood" sends 40 requests, then "trickle" 4 (10:1), into an
/// engine that runs 4 at a time; returns the tokens computed for each
/// while both had requests waiting.
fn run_flood(weights: (u32, u32)) -> (usize, usize) {
    let pool = BlockPool::new(256, 16);
    let config = SchedulerConfig {
        max_batched_tokens: 256,
        max_num_seqs: 4,
    };
    let mut s = Scheduler::new(config, pool, 8192);
    let (flood, trickle) = (share("flood", weights.0), share("trickle", weights.1));
    for key in 0..40 {
        s.add(request(key, flood.clone(), 8, 16, 1));
    }
    for key in 40..44 {
        s.add(request(key, trickle.clone(), 8, 16, 1));
    }
    let count = |steps: &[Vec<(TenantId, usize)>], who: &Share| -> usize {
        steps
            .iter()
            .flatten()
            .filter(|(t, _)| *t == who.tenant)
            .map(|(_, n)| n)
            .sum()
    };
    let steps = drive_until(&mut s, |s, _| s.waiting.waiting_for(&trickle.tenant) == 0);
    // Up to the step that admitted the trickle's last request: from then
    // on the trickle has nothing waiting and its spare share goes to the
    // flood, as it should.
    let both_waiting = &steps[..steps.len() - 1];
    (count(both_waiting, &flood), count(both_waiting, &trickle))
}

#[test]
fn a_flooding_tenant_does_not_starve_another_and_weights_set_the_shares() {
    // Equal weights: equal tokens while both have work waiting. Without
    // fair admission the trickle would wait behind 36 of the flood's
    // requests (a ratio near 10).
    let (flood, trickle) = run_flood((1, 1));
    let ratio = flood as f64 / trickle as f64;
    assert!((0.8..=1.25).contains(&ratio), "{flood} : {trickle}");
    // Weight 3 against weight 1: three tokens for one.
    let (flood, trickle) = run_flood((3, 1));
    let ratio = flood as f64 / trickle as f64;
    assert!((2.5..=3.5).contains(&ratio), "{flood} : {trickle}");
    // Weights the other way round: the flood gets a third.
    let (flood, trickle) = run_flood((1, 3));
    let ratio = flood as f64 / trickle as f64;
    assert!((0.2..=0.45).contains(&ratio), "{flood} : {trickle}");
}

#[test]
fn the_completions_of_an_n_request_compute_the_prompt_once() {
    let pool = BlockPool::new(64, 16);
    let mut s = Scheduler::new(SchedulerConfig::default(), pool.clone(), 8192);
    s.add(request(1, share("anonymous", 1), 100, 3, 4));
    let steps = drive_until(&mut s, |_, _| false);
    let computed: usize = steps.iter().flatten().map(|(_, n)| n).sum();
    // 100 prompt tokens once; each of the 3 other completions takes the
    // 6 full blocks (96 tokens) from the cache and computes the last 4;
    // then 2 decodes each (the third token is sampled, never fed back).
    assert_eq!(computed, 100 + 3 * 4 + 4 * 2);
    assert_eq!(pool.num_free(), 64);
}

#[test]
fn a_small_cache_preempts_and_still_finishes_everything() {
    let pool = BlockPool::new(6, 8);
    let config = SchedulerConfig {
        max_batched_tokens: 16,
        max_num_seqs: 8,
    };
    let mut s = Scheduler::new(config, pool.clone(), 8192);
    for (key, len) in [9, 6, 7, 8, 10, 5].into_iter().enumerate() {
        s.add(anonymous(key as u64, len, 24));
    }
    drive(&mut s);
    assert!(s.preemptions() > 0);
    assert_eq!(pool.num_free(), 6);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_under_the_budget() {
    let pool = BlockPool::new(64, 16);
    let config = SchedulerConfig {
        max_batched_tokens: 32,
        max_num_seqs: 4,
    };
    let mut s = Scheduler::new(config, pool.clone(), 8192);
    s.add(anonymous(1, 100, 2));
    let first = s.schedule();
    assert_eq!(first.num_tokens(), 32);
    assert!(
        !first.chunks[0].samples,
        "a partial prefill samples nothing"
    );
    assert!(first.sampling.is_empty());
    let updates = s.update_from_output(&first, &[]);
    assert_eq!(updates[0].computed_tokens, 32);
    assert_eq!(updates[0].token, None);
    // 100 prompt tokens in 4 steps of at most 32, then one decode step.
    assert_eq!(drive(&mut s), 4);
    assert_eq!(pool.num_free(), 64);
}

#[test]
fn updates_say_which_token_ended_a_sequence_and_why() {
    let pool = BlockPool::new(64, 16);
    let mut s = Scheduler::new(SchedulerConfig::default(), pool.clone(), 12);
    s.add(anonymous(1, 4, 3)); // ends at its third token
    s.add(anonymous(2, 4, 100)); // draws the end-of-generation token
    s.add(anonymous(3, 10, 100)); // fills the context of 12
    let step = |s: &mut Scheduler, tokens: &[u32]| {
        let out = s.schedule();
        s.update_from_output(&out, tokens)
    };
    let first = step(&mut s, &[DRAWN, DRAWN, DRAWN]);
    assert_eq!(first[0].cached_prompt_tokens, Some(0), "first admission");
    assert_eq!(first[0].computed_tokens, 4);
    assert!(first.iter().all(|u| u.finished.is_none()));
    let second = step(&mut s, &[DRAWN, EOS, DRAWN]);
    assert_eq!(second[0].cached_prompt_tokens, None, "reported once");
    assert_eq!(second[1].token, Some(EOS));
    assert_eq!(second[1].finished, Some(TokenFinish::EndOfGeneration));
    assert_eq!(second[2].finished, Some(TokenFinish::ContextLength));
    let third = step(&mut s, &[DRAWN]);
    assert_eq!(third[0].id.request, RequestKey(1));
    assert_eq!(third[0].finished, Some(TokenFinish::MaxTokens));
    assert!(s.is_idle());
    assert_eq!(pool.num_free(), 64);
}

#[test]
fn seeded_rows_carry_the_position_of_the_draw() {
    let pool = BlockPool::new(64, 16);
    let mut s = Scheduler::new(SchedulerConfig::default(), pool, 8192);
    let mut r = anonymous(1, 5, 10);
    r.sampling[0] = SamplingParamsRow {
        temperature: 0.8,
        seed: 42,
        ..SamplingParamsRow::default()
    };
    s.add(r);
    let first = s.schedule();
    assert_eq!(first.sampling[0].step, 5);
    assert_eq!(first.sampling[0].seed, 42);
    s.update_from_output(&first, &[DRAWN]);
    assert_eq!(s.schedule().sampling[0].step, 6);
}

#[test]
fn aborting_a_request_ends_its_held_back_completions_and_frees_blocks() {
    let pool = BlockPool::new(64, 16);
    let config = SchedulerConfig {
        max_batched_tokens: 16,
        max_num_seqs: 8,
    };
    let mut s = Scheduler::new(config, pool.clone(), 8192);
    s.add(request(7, share("a", 1), 40, 5, 3));
    s.add(anonymous(8, 4, 5));
    let plan = s.schedule();
    s.update_from_output(&plan, &vec![DRAWN; plan.sampling.len()]);
    let ended = s.abort(|id| id.request == RequestKey(7));
    let indices: Vec<usize> = ended.iter().map(|id| id.index).collect();
    assert_eq!(indices, [0, 1, 2], "the prompt's forks end with it");
    assert!(ended.iter().all(|id| id.request == RequestKey(7)));
    assert_eq!(s.len(), (1, 0));
    assert_eq!(s.abort(|_| true).len(), 1);
    assert!(s.is_idle());
    assert_eq!(pool.num_free(), 64);
}
