//! Capacity accounting: per interval, how long the device was busy, how many
//! tokens it made, and for whom.
//!
//! Idle time is the capacity nobody bought; a hardware backer's buyback
//! guarantee pays for it, so it must be measured, not inferred. Intervals
//! follow each other without gaps: each starts where the previous ended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};
use tokenmill_protocol::{CapacityRecord, TenantCapacity, TenantId};

/// Accumulates one interval at a time.
pub struct CapacityMeter {
    device: String,
    interval: Duration,
    started: Instant,
    started_wall: SystemTime,
    busy_seconds: f64,
    tokens: u64,
    tenants: BTreeMap<TenantId, (f64, u64)>,
}

impl CapacityMeter {
    /// A meter whose first interval starts now.
    pub fn new(device: &str, interval: Duration) -> Self {
        CapacityMeter {
            device: device.to_owned(),
            interval,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            busy_seconds: 0.0,
            tokens: 0,
            tenants: BTreeMap::new(),
        }
    }

    /// Counts a step of `seconds` that computed `tenant_tokens`; the time is
    /// split over tenants by their tokens, as usage records split it over
    /// sequences.
    pub fn record_step(&mut self, seconds: f64, tenant_tokens: &[(TenantId, usize)]) {
        let total: usize = tenant_tokens.iter().map(|(_, n)| n).sum();
        self.busy_seconds += seconds;
        self.tokens += total as u64;
        for (tenant, tokens) in tenant_tokens {
            let entry = self.tenants.entry(tenant.clone()).or_default();
            entry.0 += seconds * *tokens as f64 / total.max(1) as f64;
            entry.1 += *tokens as u64;
        }
    }

    /// The record of the current interval if it has run its length; the
    /// next interval then starts.
    pub fn roll_if_due(&mut self) -> Option<CapacityRecord> {
        (self.started.elapsed() >= self.interval).then(|| self.roll())
    }

    /// Closes the current interval whatever its length (at shutdown).
    pub fn roll(&mut self) -> CapacityRecord {
        let wall = self.started.elapsed();
        let end = self.started_wall + wall;
        let record = CapacityRecord {
            device: self.device.clone(),
            start: self.started_wall,
            end,
            wall_seconds: wall.as_secs_f64(),
            // A step that straddles the boundary is counted whole in the
            // interval it ends in; never report more busy than wall time.
            busy_seconds: self.busy_seconds.min(wall.as_secs_f64()),
            tokens: self.tokens,
            tenants: std::mem::take(&mut self.tenants)
                .into_iter()
                .map(|(tenant, (busy_seconds, tokens))| TenantCapacity {
                    tenant,
                    busy_seconds,
                    tokens,
                })
                .collect(),
        };
        self.started += wall;
        self.started_wall = end;
        self.busy_seconds = 0.0;
        self.tokens = 0;
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId(name.to_owned())
    }

    #[test]
    fn steps_split_time_by_tokens_and_intervals_do_not_overlap() {
        let mut meter = CapacityMeter::new("cpu", Duration::from_secs(3600));
        assert!(meter.roll_if_due().is_none());
        meter.record_step(0.004, &[(tenant("a"), 3), (tenant("b"), 1)]);
        meter.record_step(0.002, &[(tenant("b"), 2)]);
        std::thread::sleep(Duration::from_millis(10));
        let first = meter.roll();
        assert_eq!(first.tokens, 6);
        assert!((first.busy_seconds - 0.006).abs() < 1e-12);
        assert!(first.wall_seconds >= 0.010);
        let a = &first.tenants[0];
        let b = &first.tenants[1];
        assert_eq!((a.tenant.0.as_str(), a.tokens), ("a", 3));
        assert_eq!((b.tenant.0.as_str(), b.tokens), ("b", 3));
        assert!((a.busy_seconds - 0.003).abs() < 1e-12);
        assert!((a.busy_seconds + b.busy_seconds - first.busy_seconds).abs() < 1e-12);
        let second = meter.roll();
        assert_eq!(second.start, first.end, "intervals follow without a gap");
        assert_eq!(second.tokens, 0);
        assert!(second.tenants.is_empty());
        assert_eq!(second.busy_seconds, 0.0);
    }
}
