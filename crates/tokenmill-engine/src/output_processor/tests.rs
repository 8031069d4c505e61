//! The output processor on a toy vocabulary: no model file.

use super::*;
use crate::sched::TokenFinish;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;
use tokenmill_protocol::{
    Caller, CapacityRecord, GenerationEvent, OnRecorded, RequestId, SamplingParams, StopConditions,
    UsageEvent,
};

/// Token `i` is the `i`-th piece; the end-of-generation token is 0.
const PIECES: &[&str] = &["</s>", "Hel", "lo", " wor", "ld", "!"];

struct Toy;

impl Detokenizer for Toy {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| PIECES.get(id as usize).copied().unwrap_or(""))
            .collect()
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        PIECES
            .get(id as usize)
            .map_or(Vec::new(), |p| p.as_bytes().to_vec())
    }
}

/// Keeps what the client was sent; can hang up.
#[derive(Clone, Default)]
struct Client {
    events: Arc<Mutex<Vec<GenerationEvent>>>,
    gone: Arc<AtomicBool>,
}

impl EventSink for Client {
    fn send(&self, event: GenerationEvent) -> bool {
        self.events.lock().unwrap().push(event);
        !self.gone.load(Ordering::SeqCst)
    }
    fn is_closed(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }
}

impl Client {
    fn text(&self, index: usize) -> String {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Text { index: i, text, .. } if *i == index => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn finished(&self) -> Vec<UsageEvent> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Finished { usage, .. } => Some(usage.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Counts records; the client must not have its `Finished` before.
#[derive(Default)]
struct Meter {
    usage: Mutex<Vec<UsageEvent>>,
}

impl MeterSink for Meter {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        self.usage.lock().unwrap().push(usage.clone());
        then(Ok(()));
    }
    fn record_capacity(&self, _: &CapacityRecord) {}
}

fn request(n: usize, stop: &[&str], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: RequestId("r".into()),
        caller: Caller::anonymous(),
        model: "toy".into(),
        prompt_tokens: vec![1, 2, 3],
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop_strings: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        },
        n,
        logprobs: None,
        arrived_at: SystemTime::now(),
    }
}

fn setup(request: GenerateRequest) -> (OutputProcessor, Client, Arc<Meter>) {
    let meter = Arc::new(Meter::default());
    let mut processor = OutputProcessor::new(Arc::new(Toy), meter.clone());
    let client = Client::default();
    processor.add(RequestKey(1), request, Box::new(client.clone()), None);
    (processor, client, meter)
}

fn id(index: usize) -> SequenceId {
    SequenceId {
        request: RequestKey(1),
        index,
    }
}

fn token(index: usize, token: u32, finished: Option<TokenFinish>) -> SequenceUpdate {
    SequenceUpdate {
        id: id(index),
        computed_tokens: 1,
        cached_prompt_tokens: None,
        token: Some(token),
        finished,
    }
}

fn row(token: u32) -> SampledRow {
    SampledRow {
        token,
        logprob: -0.5,
        top: vec![(token, -0.5)],
    }
}

#[test]
fn a_stop_string_across_tokens_ends_the_sequence_and_is_cut_from_the_text() {
    let (mut p, client, meter) = setup(request(1, &["o w"], 100));
    // "Hel" | "lo" (the "o" might begin "o w": held back) | " wor": stop.
    assert!(p.process(&[token(0, 1, None)], &[row(1)], 0.1).is_empty());
    assert!(p.process(&[token(0, 2, None)], &[row(2)], 0.1).is_empty());
    assert_eq!(client.text(0), "Hell");
    let ended = p.process(&[token(0, 3, None)], &[row(3)], 0.1);
    assert_eq!(
        ended,
        [(id(0), FinishReason::Stop)],
        "the scheduler must drop it"
    );
    assert_eq!(client.text(0), "Hell");
    assert!(p.is_empty(), "billed as soon as its last completion ended");
    let usage = client.finished();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].finish_reason, FinishReason::Stop);
    assert_eq!(usage[0].tokens.completion_tokens, 3);
    assert!((usage[0].device_seconds - 0.3).abs() < 1e-9);
    assert_eq!(*meter.usage.lock().unwrap(), usage);
}

#[test]
fn the_schedulers_ends_flush_held_text_and_eos_is_no_text() {
    let (mut p, client, _) = setup(request(2, &["lo!"], 2));
    let ended = p.process(
        &[token(0, 1, None), token(1, 1, None)],
        &[row(1), row(1)],
        0.2,
    );
    assert!(ended.is_empty());
    // Completion 0 reaches its length with "lo" held back: it is flushed.
    // Completion 1 draws the end-of-generation token.
    let ended = p.process(
        &[
            token(0, 2, Some(TokenFinish::MaxTokens)),
            token(1, 0, Some(TokenFinish::EndOfGeneration)),
        ],
        &[row(2), row(0)],
        0.2,
    );
    assert!(ended.is_empty(), "the scheduler ended both itself");
    assert_eq!(client.text(0), "Hello");
    assert_eq!(client.text(1), "Hel");
    let usage = client.finished();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        usage[0].finish_reason,
        FinishReason::Length,
        "the more severe"
    );
    assert_eq!(usage[0].tokens.completion_tokens, 4);
}

#[test]
fn a_cancelled_request_is_billed_once_with_what_it_got() {
    let (mut p, client, meter) = setup(request(2, &[], 100));
    let mut first = token(0, 1, None);
    first.cached_prompt_tokens = Some(2);
    p.process(&[first, token(1, 4, None)], &[row(1), row(4)], 0.2);
    assert!(p.cancelled().is_empty());
    client.gone.store(true, Ordering::SeqCst);
    assert_eq!(p.cancelled(), [RequestKey(1)]);
    // The scheduler removed both; the processor ends them, twice over.
    p.finish(&[id(0), id(1)], FinishReason::Cancelled, None);
    p.finish(&[id(0), id(1)], FinishReason::Cancelled, None);
    assert!(p.is_empty());
    drop(p);
    let usage = meter.usage.lock().unwrap();
    assert_eq!(usage.len(), 1, "billed exactly once");
    assert_eq!(usage[0].finish_reason, FinishReason::Cancelled);
    assert_eq!(usage[0].tokens.completion_tokens, 2);
    assert_eq!(usage[0].tokens.cached_prompt_tokens, 2);
    assert_eq!(client.finished(), *usage, "the client hears of it after");
}

#[test]
fn a_request_the_loop_lets_go_of_is_billed_as_an_error() {
    let (mut p, client, meter) = setup(request(1, &[], 100));
    p.process(&[token(0, 1, None)], &[row(1)], 0.1);
    drop(p);
    let usage = meter.usage.lock().unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].finish_reason, FinishReason::Error);
    let events = client.events.lock().unwrap();
    assert!(matches!(
        events.last(),
        Some(GenerationEvent::Finished {
            error: Some(RequestFailure::EngineStopped),
            ..
        })
    ));
}

#[test]
fn logprobs_come_from_the_samplers_row() {
    let mut asked = request(1, &[], 100);
    asked.logprobs = Some(1);
    let (mut p, client, _) = setup(asked);
    p.process(&[token(0, 3, None)], &[row(3)], 0.1);
    let events = client.events.lock().unwrap();
    let Some(GenerationEvent::Text { logprobs, .. }) = events.first() else {
        panic!("{events:?}");
    };
    assert_eq!(logprobs[0].chosen.token, 3);
    assert_eq!(logprobs[0].chosen.bytes, b" wor");
    assert_eq!(logprobs[0].top.len(), 1);
}
