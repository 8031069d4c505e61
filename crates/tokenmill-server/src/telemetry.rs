//! The HTTP side's Prometheus metrics: requests and their outcomes, tokens,
//! and the latencies a client sees (time to first token, between tokens, to
//! the end).
//!
//! Tenants are not a label unless the operator names them
//! (`--metrics-tenant-label`): an allow-list keeps the number of series
//! bounded however many tenants there are; every other tenant counts as
//! "other".

use crate::openai::Endpoint;
use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tokenmill_protocol::{TenantId, UsageEvent};

/// Which tenants get their own label value.
#[derive(Clone, Debug, Default)]
pub struct TenantLabels {
    allowed: Option<Arc<HashSet<String>>>,
}

impl TenantLabels {
    /// Label the token counters by tenant for these tenants only.
    pub fn allow(tenants: impl IntoIterator<Item = String>) -> Self {
        TenantLabels {
            allowed: Some(Arc::new(tenants.into_iter().collect())),
        }
    }

    fn label(&self, tenant: &TenantId) -> Option<String> {
        let allowed = self.allowed.as_ref()?;
        Some(if allowed.contains(&tenant.0) {
            tenant.0.clone()
        } else {
            "other".to_owned()
        })
    }
}

/// Registers descriptions and units (call once, after installing a recorder).
pub fn describe() {
    describe_counter!(
        "tokenmill_requests_total",
        "Requests by endpoint, model and outcome (stop, length, cancelled, error, or the refusal)."
    );
    describe_counter!("tokenmill_prompt_tokens_total", "Prompt tokens billed.");
    describe_counter!(
        "tokenmill_cached_prompt_tokens_total",
        "Prompt tokens served from the prefix cache."
    );
    describe_counter!(
        "tokenmill_completion_tokens_total",
        "Completion tokens billed."
    );
    describe_histogram!(
        "tokenmill_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from the request's arrival to its first generated token."
    );
    describe_histogram!(
        "tokenmill_inter_token_latency_seconds",
        Unit::Seconds,
        "Time between consecutive tokens of one completion."
    );
    describe_histogram!(
        "tokenmill_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its end."
    );
}

fn endpoint_label(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat_completions",
    }
}

/// A request refused before it reached the engine.
pub fn refused(endpoint: Endpoint, model: &str, outcome: &'static str) {
    counter!("tokenmill_requests_total", "endpoint" => endpoint_label(endpoint),
        "model" => model.to_owned(), "outcome" => outcome)
    .increment(1);
}

/// Times one request from its arrival.
pub struct RequestTimer {
    endpoint: Endpoint,
    model: String,
    arrived: Instant,
    /// When each completion last produced a token.
    last_token: Vec<Option<Instant>>,
    first_token_seen: bool,
}

impl RequestTimer {
    /// A timer for a request that arrived at `arrived` with `n` completions.
    pub fn new(endpoint: Endpoint, model: &str, arrived: Instant, n: usize) -> Self {
        RequestTimer {
            endpoint,
            model: model.to_owned(),
            arrived,
            last_token: vec![None; n],
            first_token_seen: false,
        }
    }

    /// Completion `index` produced `tokens` tokens now.
    pub fn tokens(&mut self, index: usize, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        if !self.first_token_seen {
            self.first_token_seen = true;
            histogram!("tokenmill_time_to_first_token_seconds", "model" => self.model.clone())
                .record(now.duration_since(self.arrived).as_secs_f64());
        }
        if let Some(slot) = self.last_token.get_mut(index) {
            if let Some(previous) = slot.replace(now) {
                histogram!("tokenmill_inter_token_latency_seconds", "model" => self.model.clone())
                    .record(now.duration_since(previous).as_secs_f64());
            }
        }
    }

    /// The request ended with this usage record.
    pub fn finished(self, usage: &UsageEvent, tenants: &TenantLabels) {
        let model = self.model;
        counter!("tokenmill_requests_total", "endpoint" => endpoint_label(self.endpoint),
            "model" => model.clone(), "outcome" => usage.finish_reason.as_str())
        .increment(1);
        histogram!("tokenmill_request_duration_seconds", "model" => model.clone())
            .record(self.arrived.elapsed().as_secs_f64());
        let tokens = &usage.tokens;
        let mut labels = vec![("model", model)];
        if let Some(tenant) = tenants.label(&usage.tenant) {
            labels.push(("tenant", tenant));
        }
        let labels: Vec<metrics::Label> = labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        counter!("tokenmill_prompt_tokens_total", labels.clone()).increment(tokens.prompt_tokens);
        counter!("tokenmill_cached_prompt_tokens_total", labels.clone())
            .increment(tokens.cached_prompt_tokens);
        counter!("tokenmill_completion_tokens_total", labels).increment(tokens.completion_tokens);
    }
}
