//! `tokenmill serve`: load a model, start the engine, serve the API.

use crate::device::DeviceChoice;
use crate::ledger_metrics::TimedLedger;
use crate::usage_log::{Tee, TracingMeter, UsageLog};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenmill_engine::{Engine, EngineConfig, SamplerPlace, SchedulerConfig};
use tokenmill_metering::{keys, Ledger, LedgerConfig};
use tokenmill_models::{catalog, LoadedModel};
use tokenmill_nats::{ExportConfig, ExporterHandle};
use tokenmill_protocol::FinishReason;
use tokenmill_protocol::MeterSink;
use tokenmill_server::telemetry::TenantLabels;
use tokenmill_server::tenants::{KeyRegistry, LiveKeys, TenantsFile};
use tokenmill_server::{AppState, Auth, Lifecycle, Limits};

/// Flags of `tokenmill serve`. Each can also be set by the environment
/// (`TOKENMILL_<FLAG>`) or in the `--config` file; see [`crate::config`].
#[derive(Args, Debug, Serialize)]
pub struct ServeArgs {
    /// A TOML file of settings, keyed by flag name; flags and the
    /// environment override it.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the merged configuration (TOML) and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// A known model name (smollm2), installed by its script in models/, the
    /// path of a local .gguf file, or a Hugging Face model directory
    /// (config.json, *.safetensors, tokenizer.json) of a Llama, Qwen2 or
    /// Mistral model.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Run the architecture of this Hugging Face config.json with seeded
    /// random weights instead of --model's weights (for speed work where
    /// the real weights are not at hand); --model then only gives the
    /// tokenizer and chat template.
    #[arg(long)]
    random_weights: Option<PathBuf>,
    /// Seed of --random-weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: auto (a GPU when built with CUDA and one is
    /// present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Where tokens are drawn: auto (the sampling kernel on a GPU, the host
    /// sampler on the CPU), host (each sequence's sampler from its copied
    /// logit row), or batched (the sampling kernel, or on the CPU its
    /// reference).
    #[arg(long, value_enum, default_value_t = SamplerArg::Auto)]
    sampler: SamplerArg,
    /// The name clients use in `model` (default: the known name, or the
    /// file's stem).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Tokens the KV cache holds across all sequences.
    #[arg(long, default_value_t = 32768)]
    kv_cache_tokens: usize,
    /// Most tokens in one forward step.
    #[arg(long, default_value_t = 2048)]
    max_batched_tokens: usize,
    /// Most sequences in one forward step.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most requests accepted and not finished; more get 429 with
    /// Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// The tenants file: API keys (as hashes) and the tenants they bill.
    /// Make one with `tokenmill tenants add NAME`.
    #[arg(long, default_value = "tenants.toml", env = "TOKENMILL_TENANTS")]
    tenants: PathBuf,
    /// Serve everyone, without keys, as tenant "anonymous": for local
    /// development only.
    #[arg(long)]
    no_auth: bool,
    /// Append every usage and capacity record to this file, one JSON object
    /// per line.
    #[arg(long)]
    usage_log: Option<PathBuf>,
    /// Seconds per capacity record.
    #[arg(long, default_value_t = 10.0)]
    capacity_interval: f64,
    /// Label token metrics by tenant for these tenants only (comma
    /// separated); all others count as "other". Off by default: per-tenant
    /// usage lives in the usage records.
    #[arg(long, value_delimiter = ',')]
    metrics_tenant_label: Vec<String>,
    /// Seconds that requests in flight get to finish after SIGTERM or
    /// SIGINT; the rest are then cut, billed for the work done. A second
    /// signal cuts them at once.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Where the server keeps its state: the ledger and its signing key
    /// (default $XDG_DATA_HOME/tokenmill or ~/.local/share/tokenmill).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The usage ledger directory (default DATA_DIR/ledger).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// The ledger's private signing key (default DATA_DIR/ledger.key, made
    /// on first start when absent).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Keep no ledger: usage is then not durably recorded. Not for
    /// production.
    #[arg(long)]
    no_ledger: bool,
    /// The ledger's name in its signed checkpoints.
    #[arg(long, default_value = "tokenmill/ledger")]
    ledger_origin: String,
    /// Sign a checkpoint after this many records...
    #[arg(long, default_value_t = 10_000)]
    checkpoint_every: u64,
    /// ...or this many milliseconds, whichever comes first (and at
    /// shutdown).
    #[arg(long, default_value_t = 1000)]
    checkpoint_interval_ms: u64,
    /// Publish every ledger record and checkpoint to NATS JetStream at this
    /// URL (e.g. nats://127.0.0.1:4222); records wait in the ledger while
    /// NATS is down.
    #[arg(long)]
    nats_url: Option<String>,
    /// Most prompt tokens per request (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (default: the context).
    #[arg(long)]
    max_output_tokens: Option<usize>,
    /// Seconds a request may take, queueing included; then 504 and its
    /// generation is stopped (billed for what it made).
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Most API requests in progress at once, streams included; more get
    /// 503 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    max_concurrent_requests: usize,
    /// Largest request body in bytes; more get 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// The JetStream stream to publish to (made if missing).
    #[arg(long, default_value = "tokenmill-ledger")]
    nats_stream: String,
}

/// Buckets of latency histograms, in seconds: 1 ms to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Buckets of per-step counts (sequences, tokens).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Installs the Prometheus recorder every metric goes to.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Prefix("tokenmill_step_".to_owned()), COUNT_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    tokenmill_engine::telemetry::describe();
    tokenmill_server::telemetry::describe();
    crate::ledger_metrics::describe();
    Ok(handle)
}

/// How requests are authenticated, from the flags.
fn auth(args: &ServeArgs) -> anyhow::Result<Auth> {
    if args.no_auth {
        tracing::warn!("--no-auth: every request is served as tenant \"anonymous\"");
        return Ok(Auth::Disabled);
    }
    if !args.tenants.exists() {
        bail!(
            "no tenants file at {}: make one with `tokenmill tenants add NAME`, or pass --no-auth \
             to serve without keys (local development only)",
            args.tenants.display()
        );
    }
    let registry = read_keys(&args.tenants)?;
    Ok(Auth::Keys(Arc::new(LiveKeys::new(registry))))
}

/// The keys of the tenants file at `path`; a file without keys is an error
/// (it would refuse every request).
fn read_keys(path: &Path) -> anyhow::Result<KeyRegistry> {
    let file = TenantsFile::load(path)?;
    let registry = KeyRegistry::new(&file);
    if registry.is_empty() {
        bail!("{} holds no keys", path.display());
    }
    tracing::info!(
        tenants = file.tenants.len(),
        keys = registry.len(),
        file = %path.display(),
        "API keys loaded"
    );
    Ok(registry)
}

/// Reads the tenants file again on every SIGHUP, so `tokenmill tenants add`
/// takes effect without a restart. A file that cannot be read or holds no
/// keys is reported and the keys in force stay.
async fn reload_keys_on_hangup(keys: Arc<LiveKeys>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: the tenants file will not be re-read");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match read_keys(&path) {
                Ok(registry) => keys.replace(registry),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: the tenants file was not reloaded; the keys in force stay"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (keys, path);
}

/// The meter every record goes to: the ledger (unless --no-ledger), then
/// the usage log (if any), else the log output.
fn meter(args: &ServeArgs, ledger: Option<Arc<Ledger>>) -> anyhow::Result<Arc<dyn MeterSink>> {
    let mut sinks: Vec<Arc<dyn MeterSink>> = Vec::new();
    if let Some(ledger) = ledger {
        sinks.push(Arc::new(TimedLedger::new(ledger)));
    }
    match &args.usage_log {
        Some(path) => sinks.push(Arc::new(
            UsageLog::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => sinks.push(Arc::new(TracingMeter)),
    }
    Ok(Arc::new(Tee(sinks)))
}

/// The default data directory.
fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tokenmill")
}

/// Starts publishing the ledger to NATS, if asked to.
fn start_export(
    args: &ServeArgs,
    ledger: Option<&OpenLedger>,
) -> anyhow::Result<Option<ExporterHandle>> {
    let Some(url) = &args.nats_url else {
        return Ok(None);
    };
    let Some(open) = ledger else {
        bail!("--nats-url publishes the ledger: it cannot go with --no-ledger");
    };
    let config = ExportConfig::new(url.clone(), args.nats_stream.clone(), &open.dir)
        .with_ledger(open.ledger.health());
    let exporter = tokenmill_nats::spawn(config).context("starting the NATS export")?;
    tracing::info!(url = %url, stream = %args.nats_stream, "publishing the ledger to NATS JetStream");
    Ok(Some(exporter))
}

/// The open ledger and where it lives.
struct OpenLedger {
    ledger: Arc<Ledger>,
    dir: PathBuf,
}

/// Opens the ledger, making the signing key on first start.
fn open_ledger(args: &ServeArgs) -> anyhow::Result<Option<OpenLedger>> {
    if args.no_ledger {
        tracing::warn!("--no-ledger: usage is not durably recorded");
        return Ok(None);
    }
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let dir = args.ledger.clone().unwrap_or_else(|| data.join("ledger"));
    let key_path = match &args.signing_key {
        Some(path) => path.clone(),
        None => {
            let path = data.join(keys::PRIVATE_KEY_FILE);
            if !path.exists() {
                let files = keys::generate_key_files(&data, "tokenmill")
                    .with_context(|| format!("making a signing key in {}", data.display()))?;
                tracing::warn!(
                    private = %files.private.display(),
                    public = %files.public.display(),
                    "made a new ledger signing key"
                );
                eprintln!(
                    "ledger public key (give it to whoever verifies the ledger):\n{}",
                    files.verifier
                );
            }
            path
        }
    };
    let signer = keys::load_signer(&key_path)
        .with_context(|| format!("loading the signing key {}", key_path.display()))?;
    let mut config = LedgerConfig::new(&dir, args.ledger_origin.clone());
    config.checkpoint_every_records = args.checkpoint_every.max(1);
    config.checkpoint_interval = Duration::from_millis(args.checkpoint_interval_ms.max(1));
    let (ledger, report) = Ledger::open(config, signer)
        .with_context(|| format!("opening the ledger {}", dir.display()))?;
    for torn in &report.set_aside {
        tracing::warn!(
            file = %torn.file.display(),
            offset = torn.offset,
            bytes = torn.bytes,
            moved_to = %torn.moved_to.display(),
            reason = %torn.reason,
            "a torn tail of the ledger was set aside"
        );
    }
    tracing::info!(
        dir = %dir.display(),
        records = report.records,
        root = %report.root,
        "ledger open"
    );
    Ok(Some(OpenLedger {
        ledger: Arc::new(ledger),
        dir,
    }))
}

/// Where the model file is and what to call it.
fn resolve_model(args: &ServeArgs) -> anyhow::Result<(PathBuf, String)> {
    if let Some(known) = catalog::find(&args.model) {
        let path = known.path();
        if !path.exists() {
            bail!(
                "model {} is not installed at {}: run {}",
                known.name,
                path.display(),
                known.fetch_script
            );
        }
        let name = args
            .served_model_name
            .clone()
            .unwrap_or_else(|| known.name.to_owned());
        return Ok((path, name));
    }
    let path = PathBuf::from(&args.model);
    if !path.is_file() && !tokenmill_models::hf::is_model_dir(&path) {
        bail!(
            "--model {}: neither a known model ({}), a .gguf file nor a model directory with a config.json",
            args.model,
            catalog::KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((path, args.served_model_name.clone().unwrap_or(stem)))
}

/// Loads `path` (or, with `--random-weights`, its tokenizer and a random
/// model of the configured architecture) onto `device`.
fn load(path: &Path, args: &ServeArgs, device: &Device) -> anyhow::Result<LoadedModel> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let model = match &args.random_weights {
        Some(config) => {
            bar.set_message(format!("random weights for {}", config.display()));
            // bf16 is what a GPU serves; the CPU computes in f32 anyway.
            let dtype = if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            };
            LoadedModel::with_random_weights(config, args.seed, dtype, path, device, progress)
                .with_context(|| format!("building random weights for {}", config.display()))?
        }
        None => {
            bar.set_message(path.display().to_string());
            LoadedModel::load(path, device, progress)
                .with_context(|| format!("loading {}", path.display()))?
        }
    };
    bar.finish_and_clear();
    let mut model = model;
    model
        .model
        .set_forward_options(crate::device::forward_options(device))?;
    Ok(model)
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_config {
        let text = toml::to_string_pretty(&args).context("printing the configuration")?;
        println!("{}", text.trim_end());
        return Ok(());
    }
    if args.block_size == 0 || args.kv_cache_tokens < args.block_size {
        bail!("--kv-cache-tokens must hold at least one block of --block-size tokens");
    }
    if !(args.capacity_interval > 0.0 && args.capacity_interval.is_finite()) {
        bail!("--capacity-interval must be a positive number of seconds");
    }
    if !(args.request_timeout > 0.0 && args.request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    if !(args.drain_timeout >= 0.0 && args.drain_timeout.is_finite()) {
        bail!("--drain-timeout must be a number of seconds, 0 or more");
    }
    let auth = auth(&args)?;
    let open_ledger = open_ledger(&args)?;
    let exporter = start_export(&args, open_ledger.as_ref())?.map(Arc::new);
    let ledger = open_ledger.map(|open| open.ledger);
    let meter = meter(&args, ledger.clone())?;
    let (path, name) = resolve_model(&args)?;
    let (device, device_name) = crate::device::open(args.device)?;
    let started = std::time::Instant::now();
    let model = load(&path, &args, &device)?;
    let cfg = model.model.config().clone();
    tracing::info!(
        model = %name,
        path = %path.display(),
        architecture = %cfg.architecture,
        random_weights = args.random_weights.is_some(),
        layers = cfg.num_layers,
        context = cfg.context_length,
        device = %device_name,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded on {device_name}"
    );
    let engine = Engine::start(
        model,
        &name,
        EngineConfig {
            block_size: args.block_size,
            num_blocks: args.kv_cache_tokens / args.block_size,
            scheduler: SchedulerConfig {
                max_batched_tokens: args.max_batched_tokens,
                max_num_seqs: args.max_num_seqs,
            },
            max_in_flight: args.max_in_flight,
            capacity_interval: Duration::from_secs_f64(args.capacity_interval),
            device: device_name,
            sampler: match args.sampler {
                SamplerArg::Auto => SamplerPlace::Auto,
                SamplerArg::Host => SamplerPlace::Host,
                SamplerArg::Batched => SamplerPlace::Batched,
            },
        },
        meter,
    )?;
    let metrics = install_metrics()?;
    let tenant_labels = if args.metrics_tenant_label.is_empty() {
        TenantLabels::default()
    } else {
        TenantLabels::allow(args.metrics_tenant_label.clone())
    };
    let engine = Arc::new(engine);
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        max_output_tokens: args.max_output_tokens,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        max_concurrent_requests: args.max_concurrent_requests,
    };
    let live_keys = match &auth {
        Auth::Keys(keys) => Some(Arc::clone(keys)),
        Auth::Disabled => None,
    };
    let tenants_path = args.tenants.clone();
    let state =
        AppState::new(engine.clone(), limits, auth).with_metrics(metrics.clone(), tenant_labels);
    let lifecycle = state.lifecycle();
    let drain_timeout = Duration::from_secs_f64(args.drain_timeout);
    let draining_engine = engine.clone();
    let ledger_for_metrics = ledger.clone();
    let exporter_for_metrics = exporter.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding {address}"))?;
        tracing::info!("listening on http://{address}");
        if let Some(keys) = live_keys {
            tokio::spawn(reload_keys_on_hangup(keys, tenants_path));
        }
        tokio::spawn(crate::ledger_metrics::publish(
            ledger_for_metrics,
            exporter_for_metrics,
            Duration::from_secs(1),
        ));
        // Histograms are aggregated by the exporter's upkeep; run it often
        // enough that a scrape never waits on a backlog.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tokenmill_server::serve(listener, state, async {
            let _ = stopped.await;
        }));
        shutdown_signal().await;
        drain(&draining_engine, &lifecycle, drain_timeout).await;
        // Every request has its end now; connections close once their last
        // bytes are out.
        let _ = stop.send(());
        server.await.context("the server task failed")??;
        tracing::info!("server stopped");
        anyhow::Ok(())
    })?;
    // Ends the background tasks (metrics upkeep, ledger gauges) and the
    // handles they hold.
    drop(runtime);
    // The last handle: the engine thread writes its final capacity record
    // and exits.
    drop(engine);
    if let Some(ledger) = ledger {
        let closed = ledger.close().context("closing the ledger")?;
        tracing::info!(records = closed.records, root = %closed.root, "ledger closed with a final checkpoint");
    }
    if let Some(exporter) = exporter.and_then(Arc::into_inner) {
        // After the close, so the final checkpoint goes out too.
        let summary = exporter.shutdown(Duration::from_secs(10));
        tracing::info!(
            caught_up = summary.caught_up,
            published = summary.stats.published_records,
            backlog = summary.stats.backlog,
            "NATS export stopped"
        );
    }
    Ok(())
}

/// Stops admitting (503 and failing readiness), lets requests in flight
/// finish until `timeout`, then cuts the rest (or at once on a second
/// signal), and waits until every request has ended.
async fn drain(engine: &Engine, lifecycle: &Lifecycle, timeout: Duration) {
    lifecycle.start_draining();
    tracing::info!(
        in_flight = engine.in_flight(),
        timeout_seconds = timeout.as_secs_f64(),
        "draining: new requests get 503"
    );
    let idle = async {
        while engine.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = idle => return,
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(in_flight = engine.in_flight(), "drain deadline passed: cutting the requests left");
        }
        _ = shutdown_signal() => {
            tracing::warn!(in_flight = engine.in_flight(), "second signal: cutting the requests left");
        }
    }
    engine.abort_all(FinishReason::Shutdown);
    while engine.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}

/// `--sampler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerArg {
    Auto,
    Host,
    Batched,
}
