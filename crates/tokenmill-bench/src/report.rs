//! The results file (schema: docs/bench-result.schema.json, explained in
//! docs/bench.md) and the summary table printed at the end of a run.

use crate::client::RequestOptions;
use crate::run::{LevelResult, Stop};
use crate::summary::Distribution;
use crate::workload::WorkloadInfo;
use crate::{BenchError, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// The `schema` value of files this version writes; bumped when a field
/// changes meaning or goes away.
pub const SCHEMA: &str = "tokenmill-bench-result/1";

/// What was benchmarked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// `serve` (a server over HTTP) or `engine` (in-process).
    pub kind: String,
    /// The server's base URL (`serve`).
    pub base_url: Option<String>,
    /// The model file (`engine`).
    pub model_path: Option<String>,
    /// The engine's settings (`engine`).
    pub engine: Option<EngineSettings>,
}

/// The engine's sizes, as `tokenmill serve` takes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Tokens the KV cache holds.
    pub kv_cache_tokens: usize,
    /// Most tokens per step.
    pub max_batched_tokens: usize,
    /// Most sequences per step.
    pub max_num_seqs: usize,
}

/// Where the run happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// The CPU model, from /proc/cpuinfo where there is one.
    pub cpu_model: Option<String>,
    /// Logical CPUs the process may use.
    pub cpus: usize,
    /// `linux`, `macos`, ...
    pub os: String,
}

impl MachineInfo {
    /// This machine.
    pub fn here() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        });
        MachineInfo {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_owned(),
        }
    }
}

/// One run of `tokenmill bench`: its settings and every level's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`SCHEMA`].
    pub schema: String,
    /// A name for this run in tables and plots (`--label`).
    pub label: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: f64,
    /// The tokenmill version that ran it.
    pub tokenmill_version: String,
    /// The command line.
    pub command: Vec<String>,
    /// Where it ran.
    pub machine: MachineInfo,
    /// What was benchmarked.
    pub target: TargetInfo,
    /// How requests were made.
    pub request: RequestOptions,
    /// What was sent.
    pub workload: WorkloadInfo,
    /// When each level stopped sending.
    pub stop: Stop,
    /// The levels, in the order run.
    pub levels: Vec<LevelResult>,
}

impl BenchResult {
    /// Writes the results as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| BenchError::Results {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text + "\n").map_err(|e| BenchError::io(path, e))
    }

    /// Reads a results file back.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        let result: BenchResult = serde_json::from_str(&text).map_err(|e| BenchError::Results {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if result.schema != SCHEMA {
            return Err(BenchError::Results {
                path: path.display().to_string(),
                message: format!("schema {:?}, this version reads {SCHEMA:?}", result.schema),
            });
        }
        Ok(result)
    }
}

fn triple(d: &Option<Distribution>) -> String {
    match d {
        Some(d) => format!("{:.1} / {:.1} / {:.1}", d.p50, d.p90, d.p99),
        None => "-".to_owned(),
    }
}

/// A Markdown table with one row per (label, level): the summary printed
/// after a run, and the comparison `bench report` prints.
pub fn table(rows: &[(&str, &LevelResult)]) -> String {
    let with_goodput = rows.iter().any(|(_, l)| l.summary.goodput.is_some());
    let mut out = String::from(
        "| target | load | ok | failed | req/s | output tok/s | total tok/s \
         | TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 \
         | E2E ms p50 / p90 / p99 |",
    );
    if with_goodput {
        out.push_str(" goodput req/s |");
    }
    out.push_str("\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if with_goodput {
        out.push_str("---:|");
    }
    out.push('\n');
    for (label, level) in rows {
        let s = &level.summary;
        let _ = write!(
            out,
            "| {label} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {} |",
            level.load,
            s.completed,
            s.failed,
            s.request_throughput,
            s.output_throughput,
            s.total_token_throughput,
            triple(&s.ttft_ms),
            triple(&s.tpot_ms),
            triple(&s.itl_ms),
            triple(&s.e2e_ms),
        );
        if with_goodput {
            match &s.goodput {
                Some(g) => {
                    let _ = write!(out, " {:.2} ({} ok) |", g.requests_per_s, g.good_requests);
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out
}

/// Notes under the table: errors by kind (with the first message of each),
/// token-count disagreements, missing usage.
pub fn notes(rows: &[(&str, &LevelResult)]) -> String {
    let mut out = String::new();
    for (label, level) in rows {
        let s = &level.summary;
        for (kind, count) in &s.errors {
            let first = level
                .requests
                .iter()
                .filter_map(|r| r.error.as_ref())
                .find(|e| &e.kind == kind)
                .map_or("", |e| e.message.as_str());
            let _ = writeln!(
                out,
                "- {label}, {}: {count} failed with {kind} (first: {first})",
                level.load
            );
        }
        if level.warmup_failed > 0 {
            let _ = writeln!(
                out,
                "- {label}, {}: {} of {} warm-up requests failed",
                level.load, level.warmup_failed, level.warmup_requests
            );
        }
        if s.token_mismatches > 0 {
            let first = level
                .requests
                .iter()
                .find_map(|r| r.token_mismatch.as_deref())
                .unwrap_or("");
            let _ = writeln!(
                out,
                "- {label}, {}: token counts disagreed in {} requests (first: {first})",
                level.load, s.token_mismatches
            );
        }
        if s.without_usage > 0 {
            let _ = writeln!(
                out,
                "- {label}, {}: {} requests came without usage; their output tokens are counted in chunks",
                level.load, s.without_usage
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Endpoint;
    use crate::load::Load;
    use crate::metrics::{RequestError, RequestRecord, TokenSource};
    use crate::summary::Summary;

    fn result() -> BenchResult {
        let records = vec![
            RequestRecord {
                index: 0,
                ok: true,
                error: None,
                response_id: Some("cmpl-1".to_owned()),
                start_s: 0.0,
                ttft_ms: Some(10.0),
                e2e_ms: 40.0,
                tpot_ms: Some(10.0),
                itl_ms: vec![10.0, 10.0, 10.0],
                expected_prompt_tokens: Some(8),
                max_tokens: 4,
                prompt_tokens: Some(8),
                usage_completion_tokens: Some(4),
                output_tokens: 4,
                output_tokens_source: TokenSource::Usage,
                content_chunks: 4,
                token_mismatch: None,
                finish_reason: Some("length".to_owned()),
            },
            RequestRecord {
                index: 1,
                ok: false,
                error: Some(RequestError {
                    kind: "http_503".to_owned(),
                    message: "draining".to_owned(),
                }),
                response_id: None,
                start_s: 0.01,
                ttft_ms: None,
                e2e_ms: 1.0,
                tpot_ms: None,
                itl_ms: Vec::new(),
                expected_prompt_tokens: Some(8),
                max_tokens: 4,
                prompt_tokens: None,
                usage_completion_tokens: None,
                output_tokens: 0,
                output_tokens_source: TokenSource::Chunks,
                content_chunks: 0,
                token_mismatch: None,
                finish_reason: None,
            },
        ];
        let summary = Summary::of(&records, 0.04, None);
        BenchResult {
            schema: SCHEMA.to_owned(),
            label: "t".to_owned(),
            started_unix_s: 1.5,
            tokenmill_version: "0.1.0".to_owned(),
            command: vec!["tokenmill".to_owned()],
            machine: MachineInfo::here(),
            target: TargetInfo {
                kind: "serve".to_owned(),
                base_url: Some("http://x/v1".to_owned()),
                model_path: None,
                engine: None,
            },
            request: RequestOptions {
                endpoint: Endpoint::Completions,
                model: "m".to_owned(),
                ignore_eos: true,
                temperature: 0.0,
                timeout_s: 60.0,
            },
            workload: WorkloadInfo {
                seed: 0,
                prompts: "synthetic".to_owned(),
                input_len: Some("8".to_owned()),
                output_len: "4".to_owned(),
            },
            stop: Stop::Requests(2),
            levels: vec![LevelResult {
                load: Load::Concurrency { concurrency: 2 },
                warmup_requests: 1,
                warmup_failed: 0,
                summary,
                requests: records,
            }],
        }
    }

    #[test]
    fn results_round_trip_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let r = result();
        r.write(&path).unwrap();
        assert_eq!(BenchResult::read(&path).unwrap(), r);
        let mut other = r.clone();
        other.schema = "tokenmill-bench-result/0".to_owned();
        other.write(&path).unwrap();
        assert!(BenchResult::read(&path)
            .unwrap_err()
            .to_string()
            .contains("schema"));
    }

    #[test]
    fn the_table_and_notes_show_errors() {
        let r = result();
        let rows = [("t", &r.levels[0])];
        let t = table(&rows);
        assert!(t.contains("| t | concurrency 2 | 1 | 1 |"), "{t}");
        assert!(t.contains("10.0 / 10.0 / 10.0"), "{t}");
        let n = notes(&rows);
        assert!(
            n.contains("1 failed with http_503 (first: draining)"),
            "{n}"
        );
    }
}
