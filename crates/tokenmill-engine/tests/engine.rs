//! The engine on the real SmolLM2: batched requests give what each gives
//! alone, a cancelled request stops and frees its blocks, preemption under a
//! tiny KV cache recomputes without changing the output.

use candle_core::Device;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokenmill_engine::{Engine, EngineConfig, SchedulerConfig};
use tokenmill_models::{catalog, ForwardBatch, Llama, LoadedModel, LogitRows};
use tokenmill_protocol::{
    Caller, CapacityRecord, DiscardMeter, EngineClient, EventSink, FinishReason, GenerateRequest,
    GenerationEvent, MeterSink, OnRecorded, RequestId, SamplingParams, StopConditions,
    TokenLogprob, UsageEvent,
};

fn start(config: EngineConfig) -> Engine {
    start_metered(config, Arc::new(DiscardMeter))
}

fn start_metered(config: EngineConfig, meter: Arc<dyn MeterSink>) -> Engine {
    let path = catalog::find("smollm2").expect("known").path();
    let model = LoadedModel::from_gguf_file(&path, &Device::Cpu, |_, _| {})
        .expect("run models/fetch-smollm2.sh");
    Engine::start(model, "smollm2", config, meter).expect("engine starts")
}

/// A greedy request for `max_tokens` tokens of `prompt`, from the anonymous
/// tenant.
fn request(engine: &Engine, id: &str, prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: RequestId(id.to_owned()),
        caller: Caller::anonymous(),
        model: "smollm2".to_owned(),
        prompt_tokens: engine.tokenize(prompt).unwrap(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop_strings: Vec::new(),
            ignore_eos: false,
        },
        n: 1,
        logprobs: None,
        arrived_at: SystemTime::now(),
    }
}

/// Keeps every record the engine meters.
#[derive(Default)]
struct Recorder {
    usage: Mutex<Vec<UsageEvent>>,
    capacity: Mutex<Vec<CapacityRecord>>,
}

impl MeterSink for Recorder {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        self.usage.lock().unwrap().push(usage.clone());
        then(Ok(()));
    }
    fn record_capacity(&self, capacity: &CapacityRecord) {
        self.capacity.lock().unwrap().push(capacity.clone());
    }
}

/// A sink that forwards to a std channel and can be told to hang up after
/// some text events, like a client that leaves mid-stream.
struct TestSink {
    events: Sender<GenerationEvent>,
    hang_up_after: Option<usize>,
    sent: std::sync::atomic::AtomicUsize,
}

impl EventSink for TestSink {
    fn send(&self, event: GenerationEvent) -> bool {
        let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let finished = matches!(event, GenerationEvent::Finished { .. });
        let _ = self.events.send(event);
        finished || self.hang_up_after.is_none_or(|limit| n < limit)
    }

    fn is_closed(&self) -> bool {
        self.hang_up_after
            .is_some_and(|limit| self.sent.load(Ordering::SeqCst) >= limit)
    }
}

fn submit(
    engine: &Engine,
    id: &str,
    prompt: &str,
    max_tokens: usize,
    hang_up_after: Option<usize>,
) -> Receiver<GenerationEvent> {
    submit_request(
        engine,
        request(engine, id, prompt, max_tokens),
        hang_up_after,
    )
}

fn submit_request(
    engine: &Engine,
    request: GenerateRequest,
    hang_up_after: Option<usize>,
) -> Receiver<GenerationEvent> {
    let (events, receiver) = channel();
    let sink = TestSink {
        events,
        hang_up_after,
        sent: Default::default(),
    };
    engine.submit(request, Box::new(sink)).unwrap();
    receiver
}

/// One completion of a request, as the client sees it.
#[derive(Debug, Default, Clone, PartialEq)]
struct Choice {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    reason: Option<FinishReason>,
}

/// Waits for the request's end: its completions and usage record.
fn collect_all(events: Receiver<GenerationEvent>) -> (Vec<Choice>, UsageEvent) {
    let mut choices: Vec<Choice> = Vec::new();
    let mut choice = |index: usize| {
        if choices.len() <= index {
            choices.resize(index + 1, Choice::default());
        }
        index
    };
    let mut all = Vec::new();
    loop {
        match events
            .recv_timeout(Duration::from_secs(120))
            .expect("engine answers")
        {
            GenerationEvent::Text {
                index,
                text,
                token_ids,
                logprobs,
            } => all.push((choice(index), Some((text, token_ids, logprobs)), None)),
            GenerationEvent::ChoiceEnd { index, reason } => {
                all.push((choice(index), None, Some(reason)))
            }
            GenerationEvent::Finished { usage, .. } => {
                let mut out =
                    vec![Choice::default(); all.iter().map(|a| a.0 + 1).max().unwrap_or(0)];
                for (index, text, reason) in all {
                    let c = &mut out[index];
                    assert!(c.reason.is_none(), "text after the end of choice {index}");
                    if let Some((text, ids, logprobs)) = text {
                        c.text.push_str(&text);
                        c.ids.extend(ids);
                        c.logprobs.extend(logprobs);
                    }
                    c.reason = reason.or(c.reason);
                }
                return (out, usage);
            }
        }
    }
}

/// Waits for the end of a one-completion request: its text, token ids and
/// usage record.
fn collect(events: Receiver<GenerationEvent>) -> (String, Vec<u32>, UsageEvent) {
    let (mut choices, usage) = collect_all(events);
    assert_eq!(choices.len(), 1);
    let only = choices.remove(0);
    assert_eq!(only.reason, Some(usage.finish_reason));
    (only.text, only.ids, usage)
}

const PROMPTS: &[&str] = &[
    "Once upon a time, in a small village",
    "def fibonacci(n):",
    "The three primary colors are",
    "Q: What is 12 times 12?\nA:",
    "Rust's ownership model means that",
    "Here is a list of fruits:\n1.",
];

/// Waits until the engine has published a step with every block free.
fn wait_for_idle(engine: &Engine, num_blocks: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = engine.stats();
    while stats.free_blocks.load(Ordering::SeqCst) != num_blocks
        || stats.running.load(Ordering::SeqCst) != 0
        || stats.steps.load(Ordering::SeqCst) == 0
    {
        assert!(
            Instant::now() < deadline,
            "blocks were not returned to the pool"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn concurrent_requests_give_what_each_gives_alone_even_when_preempted() {
    // Alone, one at a time, with a roomy cache.
    let roomy = EngineConfig::default();
    let engine = start(roomy.clone());
    let alone: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| collect(submit(&engine, &format!("alone-{i}"), p, 24, None)))
        .collect();
    // All at once, on the same engine.
    let receivers: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| submit(&engine, &format!("together-{i}"), p, 24, None))
        .collect();
    let together: Vec<_> = receivers.into_iter().map(collect).collect();
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(
            a.1, b.1,
            "batched tokens differ from the same request alone"
        );
        assert_eq!(a.0, b.0);
        assert_eq!(b.2.tokens.completion_tokens, 24);
        assert_eq!(b.2.finish_reason, FinishReason::Length);
    }
    wait_for_idle(&engine, roomy.num_blocks);
    drop(engine);

    // A cache of 6 blocks of 8 tokens cannot hold six ~35-token sequences at
    // once: the newest are preempted and recomputed, with the same result.
    let tiny = EngineConfig {
        block_size: 8,
        num_blocks: 6,
        scheduler: SchedulerConfig {
            max_batched_tokens: 16,
            max_num_seqs: 8,
        },
        max_in_flight: 64,
        ..EngineConfig::default()
    };
    let engine = start(tiny.clone());
    let receivers: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| submit(&engine, &format!("tiny-{i}"), p, 24, None))
        .collect();
    let squeezed: Vec<_> = receivers.into_iter().map(collect).collect();
    wait_for_idle(&engine, tiny.num_blocks);
    assert!(
        engine.stats().preemptions.load(Ordering::SeqCst) > 0,
        "the test must preempt"
    );
    for (a, b) in alone.iter().zip(&squeezed) {
        assert_eq!(
            a.1, b.1,
            "recomputation after preemption changed the output"
        );
        assert_eq!(
            b.2.tokens.prompt_tokens, a.2.tokens.prompt_tokens,
            "prompt billed once"
        );
    }
}

#[test]
fn a_client_that_leaves_stops_its_generation_and_frees_its_blocks() {
    let config = EngineConfig::default();
    let engine = start(config.clone());
    let started = Instant::now();
    let (_, ids, usage) = collect(submit(&engine, "leaver", PROMPTS[0], 4000, Some(3)));
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    // It hung up on its third token: billed for exactly the three it got.
    assert_eq!(usage.tokens.completion_tokens, 3, "{usage:?}");
    assert_eq!(ids.len(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "generation did not stop"
    );
    wait_for_idle(&engine, config.num_blocks);
}

#[test]
fn a_repeated_long_prompt_is_served_from_the_prefix_cache_with_the_same_output() {
    let config = EngineConfig::default();
    let engine = start(config.clone());
    let prompt = "The history of the printing press begins in the fifteenth century. ".repeat(12);
    let (first_text, first_ids, first) = collect(submit(&engine, "first", &prompt, 16, None));
    let (second_text, second_ids, second) = collect(submit(&engine, "second", &prompt, 16, None));
    assert_eq!(first.tokens.cached_prompt_tokens, 0);
    let prompt_tokens = second.tokens.prompt_tokens;
    assert!(prompt_tokens > 100, "{prompt_tokens}");
    // Every full block but the one holding the last prompt token.
    let block = config.block_size as u64;
    assert_eq!(
        second.tokens.cached_prompt_tokens,
        (prompt_tokens - 1) / block * block
    );
    assert_eq!(
        first_ids, second_ids,
        "cached keys and values change nothing"
    );
    assert_eq!(first_text, second_text);
    wait_for_idle(&engine, config.num_blocks);
}

#[test]
fn a_full_queue_refuses_new_requests_until_one_finishes() {
    let config = EngineConfig {
        max_in_flight: 2,
        ..EngineConfig::default()
    };
    let engine = start(config.clone());
    let request = |id: &str| request(&engine, id, PROMPTS[0], 8);
    let sink = || {
        let (events, receiver) = channel();
        let sink = TestSink {
            events,
            hang_up_after: None,
            sent: Default::default(),
        };
        (Box::new(sink), receiver)
    };
    let (s1, r1) = sink();
    let (s2, r2) = sink();
    let (s3, _r3) = sink();
    engine.submit(request("one"), s1).unwrap();
    engine.submit(request("two"), s2).unwrap();
    assert_eq!(
        engine.submit(request("three"), s3).unwrap_err(),
        tokenmill_protocol::SubmitError::Overloaded {
            retry_after_seconds: 1
        }
    );
    collect(r1);
    collect(r2);
    wait_for_idle(&engine, config.num_blocks);
    assert_eq!(engine.stats().in_flight.load(Ordering::SeqCst), 0);
    let (s4, r4) = sink();
    engine.submit(request("four"), s4).unwrap();
    assert_eq!(collect(r4).2.finish_reason, FinishReason::Length);
}

#[test]
fn n_completions_share_one_prompt_and_one_usage_record() {
    let recorder = Arc::new(Recorder::default());
    let engine = start_metered(EngineConfig::default(), recorder.clone());
    let (alone_text, alone_ids, alone) = collect(submit(&engine, "alone", PROMPTS[2], 12, None));

    let mut three = request(&engine, "three", PROMPTS[2], 12);
    three.n = 3;
    let (choices, usage) = collect_all(submit_request(&engine, three, None));
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            c.ids, alone_ids,
            "greedy completion {i} differs from the request alone"
        );
        assert_eq!(c.text, alone_text);
        assert_eq!(c.reason, Some(FinishReason::Length));
    }
    // The prompt is billed once, the completions all.
    assert_eq!(usage.tokens.prompt_tokens, alone.tokens.prompt_tokens);
    assert_eq!(usage.tokens.completion_tokens, 3 * 12);
    assert_eq!(usage.finish_reason, FinishReason::Length);

    let mut seeded = request(&engine, "seeded", PROMPTS[0], 16);
    seeded.n = 2;
    seeded.sampling = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed: Some(7),
    };
    let (first, _) = collect_all(submit_request(&engine, seeded.clone(), None));
    let (again, _) = collect_all(submit_request(&engine, seeded, None));
    assert_eq!(first, again, "a seeded request is reproducible");
    assert_ne!(
        first[0].ids, first[1].ids,
        "each completion draws its own stream"
    );

    drop(engine);
    let usage = recorder.usage.lock().unwrap();
    let ids: Vec<&str> = usage.iter().map(|u| u.request_id.0.as_str()).collect();
    assert_eq!(
        ids,
        ["alone", "three", "seeded", "seeded"],
        "one record per request"
    );
}

#[test]
fn logprobs_rank_the_vocabulary_and_the_greedy_choice_is_the_top_one() {
    let engine = start(EngineConfig::default());
    let mut asked = request(&engine, "logprobs", PROMPTS[3], 10);
    asked.logprobs = Some(5);
    let (choices, _) = collect_all(submit_request(&engine, asked, None));
    let (_, plain_ids, _) = collect(submit(&engine, "plain", PROMPTS[3], 10, None));
    let choice = &choices[0];
    assert_eq!(
        choice.ids, plain_ids,
        "asking for logprobs changes nothing else"
    );
    let eog = usize::from(choice.reason == Some(FinishReason::Stop));
    assert_eq!(choice.logprobs.len(), choice.ids.len() - eog);
    for (step, lp) in choice.logprobs.iter().enumerate() {
        assert_eq!(lp.chosen.token, choice.ids[step]);
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0], lp.chosen, "greedy picks the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        let mass: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
        assert!(lp.chosen.logprob <= 0.0 && mass <= 1.0 + 1e-4, "{lp:?}");
        assert!(!lp.chosen.bytes.is_empty());
    }
    let bytes: Vec<u8> = choice
        .logprobs
        .iter()
        .flat_map(|l| l.chosen.bytes.clone())
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        choice.text,
        "token bytes spell the text"
    );
}

#[test]
fn usage_and_capacity_records_count_what_the_steps_computed() {
    let recorder = Arc::new(Recorder::default());
    let engine = start_metered(EngineConfig::default(), recorder.clone());
    let receivers: Vec<_> = PROMPTS[..3]
        .iter()
        .enumerate()
        .map(|(i, p)| submit(&engine, &format!("m{i}"), p, 9, None))
        .collect();
    let client_usage: Vec<UsageEvent> = receivers.into_iter().map(|r| collect(r).2).collect();
    drop(engine);

    let metered = recorder.usage.lock().unwrap().clone();
    assert_eq!(metered.len(), 3, "exactly one record per request");
    for usage in &client_usage {
        let record = metered
            .iter()
            .find(|m| m.request_id == usage.request_id)
            .unwrap();
        assert_eq!(record, usage, "the client's usage is the metered record");
        assert!(usage.device_seconds > 0.0);
    }
    // Every prompt token is computed once (nothing was cached) and every
    // generated token but the last is fed back as a decode.
    let computed: u64 = client_usage
        .iter()
        .map(|u| {
            u.tokens.prompt_tokens - u.tokens.cached_prompt_tokens + u.tokens.completion_tokens - 1
        })
        .sum();
    let capacity = recorder.capacity.lock().unwrap();
    assert!(!capacity.is_empty());
    assert_eq!(capacity.iter().map(|c| c.tokens).sum::<u64>(), computed);
    let busy: f64 = capacity.iter().map(|c| c.busy_seconds).sum();
    let billed: f64 = client_usage.iter().map(|u| u.device_seconds).sum();
    assert!(
        (busy - billed).abs() < 1e-6,
        "busy {busy} s, billed {billed} s"
    );
    for pair in capacity.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "intervals follow without a gap");
    }
    for c in capacity.iter() {
        assert!(c.busy_seconds <= c.wall_seconds);
        let tenants: u64 = c.tenants.iter().map(|t| t.tokens).sum();
        assert_eq!(tenants, c.tokens);
        assert!(c.tenants.iter().all(|t| t.tenant.0 == "anonymous"));
    }
}

/// A meter whose disk is gone: records fail, and it says so.
struct BrokenMeter {
    healthy: std::sync::atomic::AtomicBool,
}

impl MeterSink for BrokenMeter {
    fn record_usage(&self, _: &UsageEvent, then: OnRecorded) {
        self.healthy.store(false, Ordering::SeqCst);
        then(Err(tokenmill_protocol::RecordError::Write(
            "disk full".to_owned(),
        )));
    }
    fn record_capacity(&self, _: &CapacityRecord) {}
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

#[test]
fn when_usage_cannot_be_recorded_the_client_gets_an_error_and_new_requests_are_refused() {
    let meter = Arc::new(BrokenMeter {
        healthy: true.into(),
    });
    let engine = start_metered(EngineConfig::default(), meter);
    let events = submit(&engine, "unrecorded", PROMPTS[0], 4, None);
    let (_, usage) = collect_all(events);
    assert_eq!(
        usage.finish_reason,
        FinishReason::Error,
        "no success without a record"
    );
    let refused = engine.submit(
        request(&engine, "after", PROMPTS[0], 4),
        Box::new(TestSink {
            events: channel().0,
            hang_up_after: None,
            sent: Default::default(),
        }),
    );
    assert!(matches!(
        refused,
        Err(tokenmill_protocol::SubmitError::MeterUnavailable)
    ));
}

/// Greedy decoding by hand on the model itself: the prompt prefilled in one
/// chunk, then one decode per token (as the engine runs a lone request), the
/// argmax of each step's CPU logits, and the log-softmax of every step (the
/// model's own distribution, in f64).
fn by_hand(model: &Llama, tokens: &[u32], prompt_len: usize) -> Vec<Vec<f64>> {
    let block_size = 16;
    let cache = model.new_kv_cache(block_size, 64).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let mut log_probs = Vec::new();
    let mut start = 0;
    for end in prompt_len..=tokens.len() {
        let mut batch = ForwardBatch::default();
        batch.push(&tokens[start..end], end, table.clone(), LogitRows::Last);
        let logits = model
            .forward(&batch, &cache)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let row = &logits[0];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row
            .iter()
            .map(|l| f64::from(l - max).exp())
            .sum::<f64>()
            .ln();
        log_probs.push(row.iter().map(|l| f64::from(l - max) - log_sum).collect());
        start = end;
    }
    log_probs
}

fn argmax(values: &[f64]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// One sampler everywhere (the model's: the sampling kernel on a GPU, its
/// bit-exact CPU reference here): greedy is the argmax of the model's CPU
/// logits; a seeded request at temperature 0.8 gives the same tokens twice,
/// alone or beside other requests, and other tokens for another seed; the
/// logprobs it returns are the model's own distribution (before temperature
/// and top-p), whatever token was drawn.
#[test]
fn one_sampler_is_greedy_reproducible_and_reports_the_models_logprobs() {
    let path = catalog::find("smollm2").expect("known").path();
    let model = LoadedModel::from_gguf_file(&path, &Device::Cpu, |_, _| {})
        .expect("run models/fetch-smollm2.sh")
        .model;
    let engine = start(EngineConfig::default());
    for (i, prompt) in PROMPTS[..3].iter().enumerate() {
        let (_, ids, usage) = collect(submit(&engine, &format!("g{i}"), prompt, 12, None));
        let prompt_tokens = engine.tokenize(prompt).unwrap();
        let mut all = prompt_tokens.clone();
        all.extend(&ids[..ids.len() - 1]);
        let steps = by_hand(&model, &all, prompt_tokens.len());
        let by_hand: Vec<u32> = steps.iter().map(|lp| argmax(lp)).collect();
        assert_eq!(ids, by_hand, "greedy is the argmax of the CPU logits");
        assert_eq!(usage.tokens.completion_tokens, ids.len() as u64);
    }

    let seeded = |seed: u64, logprobs: Option<usize>| {
        let mut r = request(&engine, "s", PROMPTS[0], 16);
        r.sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(seed),
        };
        r.logprobs = logprobs;
        r
    };
    let alone = collect_all(submit_request(&engine, seeded(7, Some(3)), None)).0;
    // The same seed beside two other requests in the same steps.
    let others: Vec<_> = PROMPTS[3..5]
        .iter()
        .map(|p| submit(&engine, "o", p, 16, None))
        .collect();
    let together = collect_all(submit_request(&engine, seeded(7, Some(3)), None)).0;
    for o in others {
        collect(o);
    }
    assert_eq!(alone, together, "a seed draws the same tokens in any batch");
    let other_seed = collect_all(submit_request(&engine, seeded(8, None), None)).0;
    assert_ne!(
        alone[0].ids, other_seed[0].ids,
        "another seed, other tokens"
    );

    let choice = &alone[0];
    let prompt_tokens = engine.tokenize(PROMPTS[0]).unwrap();
    let mut all = prompt_tokens.clone();
    all.extend(&choice.ids[..choice.ids.len() - 1]);
    let steps = by_hand(&model, &all, prompt_tokens.len());
    let eog = usize::from(choice.reason == Some(FinishReason::Stop));
    assert_eq!(choice.logprobs.len(), choice.ids.len() - eog);
    for ((lp, id), model_lp) in choice.logprobs.iter().zip(&choice.ids).zip(&steps) {
        assert_eq!(lp.chosen.token, *id);
        let own = model_lp[*id as usize];
        assert!(
            (f64::from(lp.chosen.logprob) - own).abs() < 1e-3,
            "logprob {} of token {id}, the model's own is {own}",
            lp.chosen.logprob
        );
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].token, argmax(model_lp), "the most likely first");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        for alternative in &lp.top {
            let own = model_lp[alternative.token as usize];
            assert!((f64::from(alternative.logprob) - own).abs() < 1e-3);
        }
    }
}
