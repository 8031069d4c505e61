//! Random but valid records for unit tests.

use rand::Rng;
use std::time::{Duration, UNIX_EPOCH};
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantCapacity, TenantId, TokenCounts,
    UsageEvent,
};

fn text(rng: &mut impl Rng, max: usize) -> String {
    const CHARS: &[char] = &['a', 'z', '0', '-', '/', ' ', 'é', '漢', '🦀'];
    (0..rng.random_range(0..=max))
        .map(|_| CHARS[rng.random_range(0..CHARS.len())])
        .collect()
}

pub(crate) fn sample_usage(rng: &mut impl Rng) -> UsageEvent {
    let arrived = UNIX_EPOCH
        + Duration::new(
            rng.random_range(0..4_000_000_000),
            rng.random_range(0..1_000_000_000),
        );
    UsageEvent {
        request_id: RequestId(format!("chatcmpl-{}", text(rng, 12))),
        tenant: TenantId(text(rng, 8)),
        key_id: KeyId(text(rng, 8)),
        model: text(rng, 20),
        tokens: TokenCounts {
            prompt_tokens: rng.random(),
            cached_prompt_tokens: rng.random(),
            completion_tokens: rng.random(),
        },
        finish_reason: [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Cancelled,
            FinishReason::Error,
            FinishReason::Shutdown,
        ][rng.random_range(0..5)],
        device_seconds: rng.random::<f64>() * 100.0,
        arrived_at: arrived,
        finished_at: arrived + Duration::from_nanos(rng.random_range(0..10_000_000_000)),
    }
}

pub(crate) fn sample_capacity(rng: &mut impl Rng) -> CapacityRecord {
    let start = UNIX_EPOCH
        - Duration::new(
            rng.random_range(0..1_000),
            rng.random_range(0..1_000_000_000),
        );
    CapacityRecord {
        device: text(rng, 8),
        start,
        end: start + Duration::from_secs(10),
        wall_seconds: 10.0,
        busy_seconds: rng.random::<f64>() * 10.0,
        tokens: rng.random(),
        tenants: (0..rng.random_range(0..4))
            .map(|_| TenantCapacity {
                tenant: TenantId(text(rng, 6)),
                busy_seconds: -rng.random::<f64>(),
                tokens: rng.random(),
            })
            .collect(),
    }
}
