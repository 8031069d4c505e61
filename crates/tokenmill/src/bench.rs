//! `tokenmill bench`: the command line of the serving benchmark. The work is
//! in the `tokenmill-bench` crate; this file turns flags into its types.

use crate::engine_args::EngineArgs;
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokenmill_bench::client::{Endpoint, HttpTarget, RequestOptions};
use tokenmill_bench::engine_target::EngineTarget;
use tokenmill_bench::load::Load;
use tokenmill_bench::report::{self, BenchResult, MachineInfo, TargetInfo};
use tokenmill_bench::run::{run_level, LevelSpec, Stop, Target};
use tokenmill_bench::summary::Slo;
use tokenmill_bench::sweep::Sweep;
use tokenmill_bench::workload::{
    load_tokenizer, read_prompt_file, LengthSpec, PromptSource, PromptTokenizer, WordPool, Workload,
};
use tokenmill_models::catalog;

/// `tokenmill bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Benchmark an OpenAI-compatible server (tokenmill, vLLM, llama.cpp,
    /// ...) over HTTP, with streaming.
    Serve(Box<ServeBench>),
    /// Run the same workload straight into the engine, in this process, with
    /// no HTTP: the difference from `bench serve` is the server's overhead.
    Engine(Box<EngineBench>),
    /// Print one comparison table of saved results (--json files) and draw
    /// their plots together.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct ServeBench {
    /// The server's OpenAI base URL, with or without the final `/v1`
    /// (`http://127.0.0.1:8000` and `http://127.0.0.1:8000/v1` are the
    /// same).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    base_url: String,
    /// The `model` to ask for.
    #[arg(long)]
    model: String,
    /// Bearer token to send.
    #[arg(long, env = "TOKENMILL_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's tokenizer, to make prompts of an exact token length: a
    /// .gguf file, a tokenizer.json, or a directory holding one (default:
    /// the installed model named by --model, when it is a known one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A JSON object whose fields are added to every request body (for
    /// server-specific parameters).
    #[arg(long, value_parser = parse_json_object)]
    extra_body: Option<Map<String, Value>>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct EngineBench {
    /// The model and the engine, with `serve`'s flags and defaults.
    #[command(flatten)]
    engine: EngineArgs,
    /// Seed of --random-weights (`--seed` is the workload's).
    #[arg(long, default_value_t = 0)]
    weights_seed: u64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EndpointArg {
    Completions,
    Chat,
}

/// Flags shared by `bench serve` and `bench engine`.
#[derive(Args, Debug)]
struct CommonArgs {
    /// The API: /v1/completions or /v1/chat/completions (the prompt is then
    /// one user message, and the chat template adds tokens to it).
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: EndpointArg,
    /// Clients, each sending its next request when its last one ends.
    #[arg(long, conflicts_with_all = ["request_rate", "sweep"])]
    concurrency: Option<usize>,
    /// Poisson arrivals at this many requests per second (`inf`: all at
    /// once).
    #[arg(long, value_parser = parse_rate, conflicts_with = "sweep")]
    request_rate: Option<f64>,
    /// With --request-rate: most requests in flight; later arrivals wait.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Levels to run in turn with the same workload: concurrency=1,2,4,8 or
    /// request-rate=1,2,4,inf.
    #[arg(long)]
    sweep: Option<Sweep>,
    /// Measured requests per level.
    #[arg(long, default_value_t = 50, conflicts_with = "duration")]
    num_requests: u64,
    /// Instead of a request count: send for this many seconds per level
    /// (requests in flight at the end are waited for).
    #[arg(long)]
    duration: Option<f64>,
    /// Unmeasured requests sent before each level.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Prompt tokens: N, uniform:MIN:MAX or normal:MEAN:STD.
    #[arg(long, default_value = "128")]
    input_len: LengthSpec,
    /// Output tokens (max_tokens): N, uniform:MIN:MAX or normal:MEAN:STD.
    #[arg(long, default_value = "128")]
    output_len: LengthSpec,
    /// Prompts from a JSONL file ({"prompt": "...", "output_len": N} per
    /// line) instead of synthetic ones.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Ask for exactly max_tokens output tokens (ignore_eos).
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Seed of prompts, lengths and arrival times: the same seed sends the
    /// same work.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds one request may take before it counts as a timeout.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Objectives for goodput, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=10000.
    #[arg(long)]
    goodput: Option<Slo>,
    /// Write every setting and raw measurement here (schema:
    /// docs/bench-result.schema.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw PNG plots into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// The run's name in tables and plots (default: serve or engine).
    #[arg(long)]
    label: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Results files written with --json.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Draw their plots together into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate = if s == "inf" {
        f64::INFINITY
    } else {
        s.parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number"))?
    };
    if rate > 0.0 {
        Ok(rate)
    } else {
        Err("the request rate must be positive".to_owned())
    }
}

fn parse_json_object(s: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("expected a JSON object".to_owned()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Runs `tokenmill bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Serve(a) => serve(*a),
        BenchCommand::Engine(a) => engine(*a),
        BenchCommand::Report(a) => report_files(a),
    }
}

impl CommonArgs {
    fn levels(&self) -> anyhow::Result<Vec<Load>> {
        if let Some(sweep) = &self.sweep {
            return Ok(sweep
                .clone()
                .with_max_concurrency(self.max_concurrency)
                .levels);
        }
        if let Some(rate) = self.request_rate {
            return Ok(vec![Load::RequestRate {
                rate,
                max_concurrency: self.max_concurrency,
            }]);
        }
        let concurrency = self.concurrency.unwrap_or(1);
        if concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        Ok(vec![Load::Concurrency { concurrency }])
    }

    fn stop(&self) -> anyhow::Result<Stop> {
        match self.duration {
            Some(d) if d > 0.0 && d.is_finite() => Ok(Stop::Seconds(d)),
            Some(_) => bail!("--duration must be a positive number of seconds"),
            None if self.num_requests == 0 => bail!("--num-requests must be at least 1"),
            None => Ok(Stop::Requests(self.num_requests)),
        }
    }

    fn endpoint(&self) -> Endpoint {
        match self.endpoint {
            EndpointArg::Completions => Endpoint::Completions,
            EndpointArg::Chat => Endpoint::Chat,
        }
    }

    fn request_options(&self, model: String) -> anyhow::Result<RequestOptions> {
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            bail!("--timeout must be a positive number of seconds");
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            bail!("--temperature must be between 0 and 2");
        }
        Ok(RequestOptions {
            endpoint: self.endpoint(),
            model,
            ignore_eos: self.ignore_eos,
            temperature: self.temperature,
            timeout_s: self.timeout,
        })
    }

    /// The workload: synthetic prompts need a tokenizer, a prompt file only
    /// uses one (when there is one) to know each prompt's length.
    fn workload(&self, tokenizer: Option<Arc<dyn PromptTokenizer>>) -> anyhow::Result<Workload> {
        let source = match &self.prompts {
            Some(path) => PromptSource::File {
                path: path.clone(),
                prompts: Arc::new(read_prompt_file(path)?),
                tokenizer,
            },
            None => {
                let Some(tokenizer) = tokenizer else {
                    bail!(
                        "synthetic prompts of an exact token length need the model's tokenizer: \
                         pass --tokenizer (a .gguf, a tokenizer.json or its directory), or \
                         --prompts FILE"
                    );
                };
                let pool = WordPool::new(tokenizer.as_ref())?;
                PromptSource::Synthetic {
                    input: self.input_len,
                    tokenizer,
                    pool: Arc::new(pool),
                }
            }
        };
        let workload = Workload::new(source, self.output_len, self.seed);
        // Fail before anything is sent when prompts cannot be made.
        workload.request(tokenmill_bench::workload::Stream::Measured, 0)?;
        Ok(workload)
    }
}

fn serve(args: ServeBench) -> anyhow::Result<()> {
    let tokenizer_path = match &args.tokenizer {
        Some(p) => Some(p.clone()),
        None => catalog::find(&args.model)
            .map(|k| k.path())
            .filter(|p| p.exists()),
    };
    let tokenizer = tokenizer_path.as_deref().map(load_tokenizer).transpose()?;
    let workload = args.common.workload(tokenizer)?;
    let options = args.common.request_options(args.model.clone())?;
    let target = HttpTarget::new(
        &args.base_url,
        args.api_key.clone(),
        options.clone(),
        args.extra_body.clone().unwrap_or_default(),
    )?;
    let info = TargetInfo {
        kind: "serve".to_owned(),
        base_url: Some(args.base_url.clone()),
        model_path: None,
        engine: None,
    };
    execute(&args.common, Target::Http(target), workload, options, info)
}

fn engine(args: EngineBench) -> anyhow::Result<()> {
    let settings = args.engine.settings(args.weights_seed)?;
    let tokenizer = load_tokenizer(&settings.model_path)?;
    let workload = args.common.workload(Some(tokenizer))?;
    let options = args.common.request_options(settings.served_name.clone())?;
    let (device, device_name) = settings.open_device()?;
    let model = settings.load(&device, args.common.no_progress)?;
    // No limit on requests in flight: the workload decides how many there
    // are. Capacity records are discarded with the usage.
    let config = settings.engine_config(&device_name, usize::MAX, Duration::from_secs(3600));
    let target = EngineTarget::start(model, config, options.clone())?;
    let info = TargetInfo {
        kind: "engine".to_owned(),
        base_url: None,
        model_path: Some(settings.model_path.display().to_string()),
        engine: Some(settings.report()),
    };
    execute(
        &args.common,
        Target::Engine(target),
        workload,
        options,
        info,
    )
}

/// Runs every level, prints the table, writes the JSON and the plots.
fn execute(
    common: &CommonArgs,
    target: Target,
    workload: Workload,
    options: RequestOptions,
    info: TargetInfo,
) -> anyhow::Result<()> {
    let levels = common.levels()?;
    let stop = common.stop()?;
    let label = common.label.clone().unwrap_or_else(|| info.kind.clone());
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // One thread drives every client: on a small machine that shares its
    // cores with the server under test, the client should take as little of
    // them as it can, and a few hundred chunks a second do not need more.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let target = Arc::new(target);
    let workload_info = workload.describe();
    let workload = Arc::new(workload);
    let mut results = Vec::new();
    for load in levels {
        let spec = LevelSpec {
            load,
            stop,
            warmup: common.warmup,
            slo: common.goodput.clone(),
            progress: !common.no_progress,
        };
        let level = runtime.block_on(run_level(target.clone(), workload.clone(), &spec))?;
        let s = &level.summary;
        eprintln!(
            "{label}, {}: {} ok, {} failed in {:.1} s; {:.1} output tok/s",
            level.load, s.completed, s.failed, s.duration_s, s.output_throughput
        );
        results.push(level);
    }
    // Dropping the target stops an in-process engine (its thread joins).
    drop(target);
    let result = BenchResult {
        schema: report::SCHEMA.to_owned(),
        label,
        started_unix_s,
        tokenmill_version: env!("CARGO_PKG_VERSION").to_owned(),
        command: std::env::args().collect(),
        machine: MachineInfo::here(),
        target: info,
        request: options,
        workload: workload_info,
        stop,
        levels: results,
    };
    print_results(&[&result]);
    if let Some(path) = &common.json {
        result.write(path)?;
        eprintln!("results: {}", path.display());
    }
    if let Some(dir) = &common.plots {
        plots(dir, std::slice::from_ref(&result))?;
    }
    // A level where nothing succeeded measured nothing (a wrong URL, model
    // or key): say so with the exit status too, after the results are
    // written for a look at the errors.
    if let Some(level) = result
        .levels
        .iter()
        .find(|l| l.summary.completed == 0 && l.summary.failed > 0)
    {
        let errors: Vec<String> = level
            .summary
            .errors
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        bail!(
            "every request of level {} failed ({})",
            level.load,
            errors.join(", ")
        );
    }
    Ok(())
}

fn print_results(results: &[&BenchResult]) {
    let rows: Vec<(&str, &tokenmill_bench::run::LevelResult)> = results
        .iter()
        .flat_map(|r| r.levels.iter().map(move |l| (r.label.as_str(), l)))
        .collect();
    println!("{}", report::table(&rows));
    let notes = report::notes(&rows);
    if !notes.is_empty() {
        println!("{notes}");
    }
}

fn plots(dir: &Path, results: &[BenchResult]) -> anyhow::Result<()> {
    for path in tokenmill_bench::plot::write_plots(dir, results)? {
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

fn report_files(args: ReportArgs) -> anyhow::Result<()> {
    let results = args
        .files
        .iter()
        .map(|p| BenchResult::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    print_results(&results.iter().collect::<Vec<_>>());
    if let Some(dir) = &args.plots {
        plots(dir, &results)?;
    }
    Ok(())
}
