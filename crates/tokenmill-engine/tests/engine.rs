//! The engine on the real SmolLM2: batched requests give what each gives
//! alone, a cancelled request stops and frees its blocks, preemption under a
//! tiny KV cache recomputes without changing the output.

use candle_core::Device;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};
use tokenmill_engine::{Engine, EngineConfig, SchedulerConfig};
use tokenmill_models::{catalog, LoadedModel};
use tokenmill_protocol::{
    EngineClient, EventSink, FinishReason, GenerateRequest, GenerationEvent, RequestId,
    SamplingParams, StopConditions, TenantId, UsageEvent,
};

fn start(config: EngineConfig) -> Engine {
    let path = catalog::find("smollm2").expect("known").path();
    let model = LoadedModel::from_gguf_file(&path, &Device::Cpu, |_, _| {})
        .expect("run models/fetch-smollm2.sh");
    Engine::start(model, "smollm2", config).expect("engine starts")
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
    let (events, receiver) = channel();
    let request = GenerateRequest {
        id: RequestId(id.to_owned()),
        tenant: TenantId::anonymous(),
        model: "smollm2".to_owned(),
        prompt_tokens: engine.tokenize(prompt).unwrap(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop_strings: Vec::new(),
        },
        arrived_at: SystemTime::now(),
    };
    let sink = TestSink {
        events,
        hang_up_after,
        sent: Default::default(),
    };
    engine.submit(request, Box::new(sink)).unwrap();
    receiver
}

/// Waits for the request's end: its text, token ids and usage record.
fn collect(events: Receiver<GenerationEvent>) -> (String, Vec<u32>, UsageEvent) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    loop {
        match events
            .recv_timeout(Duration::from_secs(120))
            .expect("engine answers")
        {
            GenerationEvent::Text { text: t, token_ids } => {
                text.push_str(&t);
                ids.extend(token_ids);
            }
            GenerationEvent::Finished { usage, .. } => return (text, ids, usage),
        }
    }
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
    let request = |id: &str| GenerateRequest {
        id: RequestId(id.to_owned()),
        tenant: TenantId::anonymous(),
        model: "smollm2".to_owned(),
        prompt_tokens: engine.tokenize(PROMPTS[0]).unwrap(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: 8,
            stop_strings: Vec::new(),
        },
        arrived_at: SystemTime::now(),
    };
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
