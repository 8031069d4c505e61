//! From one level's request records to the figures people compare:
//! percentiles, throughput, goodput, errors by kind.

use crate::metrics::RequestRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;

/// The `p`-th percentile (0 to 100) of `sorted` (ascending), interpolating
/// linearly between the two nearest ranks: the p-th percentile sits at rank
/// `p/100 * (n - 1)`. None for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (p / 100.0).clamp(0.0, 1.0) * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// A latency's distribution over a level's successful requests, in ms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Values it is over.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Distribution {
    /// The distribution of `values` (any order); None when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        let p = |q| percentile(&values, q);
        Some(Distribution {
            count: values.len() as u64,
            mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
            min: *values.first()?,
            p50: p(50.0)?,
            p90: p(90.0)?,
            p95: p(95.0)?,
            p99: p(99.0)?,
            max: *values.last()?,
        })
    }
}

/// Service-level objectives a request must meet to count toward goodput.
/// Bounds not given are not checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// Most time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Most time per output token, ms.
    pub tpot_ms: Option<f64>,
    /// Most end-to-end latency, ms.
    pub e2e_ms: Option<f64>,
}

impl FromStr for Slo {
    type Err = String;

    /// `ttft_ms=500,tpot_ms=50,e2e_ms=10000` (any subset, at least one).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=MILLISECONDS"))?;
            let value: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{part:?}: the bound must be a positive number of ms"))?;
            let slot = match key.trim() {
                "ttft_ms" | "ttft" => &mut slo.ttft_ms,
                "tpot_ms" | "tpot" => &mut slo.tpot_ms,
                "e2e_ms" | "e2e" => &mut slo.e2e_ms,
                other => {
                    return Err(format!(
                        "unknown objective {other:?}: use ttft_ms, tpot_ms or e2e_ms"
                    ))
                }
            };
            *slot = Some(value);
        }
        if slo == Slo::default() {
            return Err("no objective given: e.g. ttft_ms=500,tpot_ms=50".to_owned());
        }
        Ok(slo)
    }
}

impl Slo {
    /// Whether a successful request meets every bound. A request with one
    /// output token has no TPOT and meets that bound.
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let within = |bound: Option<f64>, value: Option<f64>| match (bound, value) {
            (None, _) | (Some(_), None) => true,
            (Some(b), Some(v)) => v <= b,
        };
        r.ok && (self.ttft_ms.is_none() || r.ttft_ms.is_some())
            && within(self.ttft_ms, r.ttft_ms)
            && within(self.tpot_ms, r.tpot_ms)
            && within(self.e2e_ms, Some(r.e2e_ms))
    }
}

/// Goodput: the requests that met the objectives, per second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Goodput {
    /// The objectives.
    pub slo: Slo,
    /// Requests that met all of them.
    pub good_requests: u64,
    /// `good_requests / duration_s`.
    pub requests_per_s: f64,
}

/// One level's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Measured requests sent.
    pub requests: u64,
    /// Of those, completed without error.
    pub completed: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Failed requests by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Seconds from the first measured request sent to the last one ended.
    pub duration_s: f64,
    /// Prompt tokens of completed requests (usage, else the workload's count).
    pub prompt_tokens: u64,
    /// Output tokens of completed requests.
    pub output_tokens: u64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    /// Time to first token.
    pub ttft_ms: Option<Distribution>,
    /// Time per output token.
    pub tpot_ms: Option<Distribution>,
    /// Inter-token latency: every gap of every completed request.
    pub itl_ms: Option<Distribution>,
    /// End-to-end latency.
    pub e2e_ms: Option<Distribution>,
    /// Goodput, when objectives were given.
    pub goodput: Option<Goodput>,
    /// Completed requests whose token counts disagreed (see
    /// `RequestRecord::token_mismatch`).
    pub token_mismatches: u64,
    /// Completed requests without a usage from the server (their output is
    /// counted in chunks).
    pub without_usage: u64,
}

impl Summary {
    /// Summarises `records`, which took `duration_s`.
    pub fn of(records: &[RequestRecord], duration_s: f64, slo: Option<&Slo>) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
        let mut errors = BTreeMap::new();
        for r in records.iter().filter(|r| !r.ok) {
            let kind = r.error.as_ref().map_or("unknown", |e| e.kind.as_str());
            *errors.entry(kind.to_owned()).or_insert(0) += 1;
        }
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let prompt_tokens: u64 = ok.iter().map(|r| r.prompt_tokens_for_totals()).sum();
        let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let goodput = slo.map(|slo| {
            let good = ok.iter().filter(|r| slo.met_by(r)).count() as u64;
            Goodput {
                slo: slo.clone(),
                good_requests: good,
                requests_per_s: per_s(good as f64),
            }
        });
        Summary {
            requests: records.len() as u64,
            completed: ok.len() as u64,
            failed: (records.len() - ok.len()) as u64,
            errors,
            duration_s,
            prompt_tokens,
            output_tokens,
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(output_tokens as f64),
            total_token_throughput: per_s((prompt_tokens + output_tokens) as f64),
            ttft_ms: Distribution::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
            tpot_ms: Distribution::of(ok.iter().filter_map(|r| r.tpot_ms).collect()),
            itl_ms: Distribution::of(ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect()),
            e2e_ms: Distribution::of(ok.iter().map(|r| r.e2e_ms).collect()),
            goodput,
            token_mismatches: ok.iter().filter(|r| r.token_mismatch.is_some()).count() as u64,
            without_usage: ok
                .iter()
                .filter(|r| r.usage_completion_tokens.is_none())
                .count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RequestError, TokenSource};

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 1..=100: the 99th percentile at rank 98.01
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&hundred, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert!((percentile(&hundred, 50.0).unwrap() - 50.5).abs() < 1e-9);
    }

    #[test]
    fn distributions_sort_their_input_and_skip_nothing_finite() {
        let d = Distribution::of(vec![5.0, 1.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((d.count, d.min, d.p50, d.max), (3, 1.0, 3.0, 5.0));
        assert!((d.mean - 3.0).abs() < 1e-12);
        assert_eq!(Distribution::of(Vec::new()), None);
    }

    fn record(ok: bool, ttft: f64, tpot: Option<f64>, e2e: f64, out: u64) -> RequestRecord {
        RequestRecord {
            index: 0,
            ok,
            error: (!ok).then(|| RequestError {
                kind: "http_500".to_owned(),
                message: String::new(),
            }),
            response_id: None,
            start_s: 0.0,
            ttft_ms: Some(ttft),
            e2e_ms: e2e,
            tpot_ms: tpot,
            itl_ms: vec![tpot.unwrap_or(0.0); out.saturating_sub(1) as usize],
            expected_prompt_tokens: Some(10),
            max_tokens: out,
            prompt_tokens: None,
            usage_completion_tokens: Some(out),
            output_tokens: out,
            output_tokens_source: TokenSource::Usage,
            content_chunks: out,
            token_mismatch: None,
            finish_reason: Some("length".to_owned()),
        }
    }

    #[test]
    fn throughput_goodput_and_errors() {
        let records = vec![
            record(true, 100.0, Some(10.0), 190.0, 10),
            record(true, 600.0, Some(10.0), 690.0, 10),
            record(true, 100.0, Some(60.0), 640.0, 10),
            record(true, 100.0, None, 100.0, 1),
            record(false, 0.0, None, 5.0, 0),
        ];
        let slo: Slo = "ttft_ms=500,tpot_ms=50".parse().unwrap();
        let s = Summary::of(&records, 2.0, Some(&slo));
        assert_eq!((s.requests, s.completed, s.failed), (5, 4, 1));
        assert_eq!(s.errors.get("http_500"), Some(&1));
        assert_eq!(s.output_tokens, 31);
        assert_eq!(s.prompt_tokens, 40);
        assert!((s.request_throughput - 2.0).abs() < 1e-12);
        assert!((s.output_throughput - 15.5).abs() < 1e-12);
        assert!((s.total_token_throughput - 35.5).abs() < 1e-12);
        let g = s.goodput.unwrap();
        // The first (fast) and the one-token request meet both bounds.
        assert_eq!(g.good_requests, 2);
        assert!((g.requests_per_s - 1.0).abs() < 1e-12);
        assert_eq!(s.ttft_ms.unwrap().count, 4);
        assert_eq!(s.tpot_ms.unwrap().count, 3);
        assert_eq!(s.itl_ms.unwrap().count, 27);
    }

    #[test]
    fn objectives_parse() {
        let slo: Slo = "ttft_ms=500, e2e=2000".parse().unwrap();
        assert_eq!(slo.ttft_ms, Some(500.0));
        assert_eq!(slo.tpot_ms, None);
        assert_eq!(slo.e2e_ms, Some(2000.0));
        for bad in ["", "ttft_ms", "ttft_ms=-1", "ttft_ms=x", "latency=3"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad:?}");
        }
    }
}
