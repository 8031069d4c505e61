//! The engine's Prometheus metrics, through the `metrics` facade: the binary
//! installs an exporter; without one these calls do nothing.
//!
//! No tenant label here: per-tenant usage lives in usage records, and a label
//! per tenant would make the metric's cardinality grow with the customer
//! list.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

/// Registers descriptions and units (call once, after installing a recorder).
pub fn describe() {
    describe_gauge!(
        "tokenmill_sequences_running",
        "Sequences admitted (prefilling or decoding)."
    );
    describe_gauge!(
        "tokenmill_sequences_waiting",
        "Sequences waiting for admission."
    );
    describe_gauge!(
        "tokenmill_kv_blocks_free",
        "KV cache blocks not owned by a sequence."
    );
    describe_gauge!(
        "tokenmill_kv_blocks_used",
        "KV cache blocks owned by sequences."
    );
    describe_counter!(
        "tokenmill_preemptions_total",
        "Sequences preempted for lack of KV blocks."
    );
    describe_counter!("tokenmill_steps_total", "Forward steps run.");
    describe_histogram!("tokenmill_step_sequences", "Sequences in one forward step.");
    describe_histogram!(
        "tokenmill_step_tokens",
        "Tokens (prefill and decode) in one forward step."
    );
    describe_histogram!(
        "tokenmill_step_forward_seconds",
        Unit::Seconds,
        "Time of the model's forward in one step."
    );
    describe_histogram!(
        "tokenmill_step_overhead_seconds",
        Unit::Seconds,
        "Time of one step outside the forward: scheduling, sampling, metering, events."
    );
    describe_histogram!(
        "tokenmill_request_queue_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its first admission."
    );
    describe_counter!(
        "tokenmill_prefix_cache_queried_tokens_total",
        "Prompt tokens looked up in the prefix cache at admission."
    );
    describe_counter!(
        "tokenmill_prefix_cache_hit_tokens_total",
        "Prompt tokens found in the prefix cache at admission."
    );
}

/// One step ran.
pub(crate) fn step(sequences: usize, tokens: usize, forward_seconds: f64, overhead_seconds: f64) {
    counter!("tokenmill_steps_total").increment(1);
    histogram!("tokenmill_step_sequences").record(sequences as f64);
    histogram!("tokenmill_step_tokens").record(tokens as f64);
    histogram!("tokenmill_step_forward_seconds").record(forward_seconds);
    histogram!("tokenmill_step_overhead_seconds").record(overhead_seconds);
}

/// The scheduler's state after a step.
pub(crate) fn state(waiting: usize, running: usize, free_blocks: usize, total_blocks: usize) {
    gauge!("tokenmill_sequences_waiting").set(waiting as f64);
    gauge!("tokenmill_sequences_running").set(running as f64);
    gauge!("tokenmill_kv_blocks_free").set(free_blocks as f64);
    gauge!("tokenmill_kv_blocks_used").set(total_blocks.saturating_sub(free_blocks) as f64);
}

/// Sequences were preempted.
pub(crate) fn preempted(count: u64) {
    counter!("tokenmill_preemptions_total").increment(count);
}

/// A request was admitted for the first time after waiting this long.
pub(crate) fn admitted(queue_seconds: f64) {
    histogram!("tokenmill_request_queue_seconds").record(queue_seconds);
}

/// A prefix-cache lookup at admission.
pub(crate) fn prefix_lookup(queried: usize, hit: usize) {
    counter!("tokenmill_prefix_cache_queried_tokens_total").increment(queried as u64);
    counter!("tokenmill_prefix_cache_hit_tokens_total").increment(hit as u64);
}
