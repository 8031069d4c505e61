//! Where usage goes: the signed ledger (its key made on first start), its
//! export to NATS JetStream, the optional usage log, chained into the one
//! meter the engine records to.

use super::args::ServeArgs;
use crate::ledger_metrics::TimedLedger;
use crate::usage_log::{Tee, TracingMeter, UsageLog};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokenmill_metering::cosignature::CosignerKey;
use tokenmill_metering::{keys, Ledger, LedgerConfig, VerifierKey};
use tokenmill_nats::{ExportConfig, ExporterHandle};
use tokenmill_protocol::MeterSink;
use tokenmill_witness::submit::{Submitter, WitnessEndpoint};

/// The meter every record goes to: the ledger (unless --no-ledger), then
/// the usage log (if any), else the log output.
pub fn meter(args: &ServeArgs, ledger: Option<Arc<Ledger>>) -> anyhow::Result<Arc<dyn MeterSink>> {
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
pub fn start_export(
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
pub struct OpenLedger {
    /// The ledger.
    pub ledger: Arc<Ledger>,
    /// Its directory.
    pub dir: PathBuf,
    /// The public key of its checkpoints.
    pub verifier: VerifierKey,
}

/// Opens the ledger, making the signing key on first start.
pub fn open_ledger(args: &ServeArgs) -> anyhow::Result<Option<OpenLedger>> {
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
    let verifier = signer.verifier();
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
        verifier,
    }))
}

/// Closes the ledger with a final checkpoint, then stops the NATS export
/// once it has published that checkpoint too.
pub fn close(
    ledger: Option<Arc<Ledger>>,
    exporter: Option<Arc<ExporterHandle>>,
) -> anyhow::Result<()> {
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

/// The submitter of checkpoints to `--witness`es, if any are named.
pub fn witness_submitter(
    args: &ServeArgs,
    ledger: Option<&OpenLedger>,
) -> anyhow::Result<Option<Submitter>> {
    if args.witnesses.is_empty() {
        return Ok(None);
    }
    let Some(open) = ledger else {
        bail!("--witness cosigns the ledger's checkpoints: it cannot go with --no-ledger");
    };
    let endpoints = args
        .witnesses
        .iter()
        .map(|(url, key)| {
            let path = std::path::Path::new(key);
            let text = if path.is_file() {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
            } else {
                key.clone()
            };
            let key = CosignerKey::parse(text.trim())
                .with_context(|| format!("--witness {url}: {key:?} is not a witness key"))?;
            Ok(WitnessEndpoint {
                url: url.clone(),
                key,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    tracing::info!(
        witnesses = endpoints.len(),
        "submitting checkpoints to witnesses"
    );
    let submitter = Submitter::new(&open.dir, vec![open.verifier.clone()], endpoints)
        .context("starting the witness submission")?;
    Ok(Some(submitter))
}
