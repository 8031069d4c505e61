//! `serve`'s flags ([`ServeArgs`], what the user typed) and what they mean
//! once checked ([`ServeSettings`]): the engine's part is shared with
//! `bench engine` ([`crate::engine_args`]); the rest is the server's own.

use crate::engine_args::{EngineArgs, EngineSettings};
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use tokenmill_server::Limits;

/// Flags of `tokenmill serve`. Each can also be set by the environment
/// (`TOKENMILL_<FLAG>`) or in the `--config` file; see [`crate::config`].
#[derive(Args, Debug, Serialize)]
pub struct ServeArgs {
    /// A TOML file of settings, keyed by flag name; flags and the
    /// environment override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the merged configuration (TOML) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub engine: EngineArgs,
    /// Seed of --random-weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Most requests accepted and not finished; more get 429 with
    /// Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// The tenants file: API keys (as hashes) and the tenants they bill.
    /// Make one with `tokenmill tenants add NAME`.
    #[arg(long, default_value = "tenants.toml", env = "TOKENMILL_TENANTS")]
    pub tenants: PathBuf,
    /// Serve everyone, without keys, as tenant "anonymous": for local
    /// development only.
    #[arg(long)]
    pub no_auth: bool,
    /// Append every usage and capacity record to this file, one JSON object
    /// per line.
    #[arg(long)]
    pub usage_log: Option<PathBuf>,
    /// Seconds per capacity record.
    #[arg(long, default_value_t = 10.0)]
    pub capacity_interval: f64,
    /// Label token metrics by tenant for these tenants only (comma
    /// separated); all others count as "other". Off by default: per-tenant
    /// usage lives in the usage records.
    #[arg(long, value_delimiter = ',')]
    pub metrics_tenant_label: Vec<String>,
    /// Seconds that requests in flight get to finish after SIGTERM or
    /// SIGINT; the rest are then cut, billed for the work done. A second
    /// signal cuts them at once.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Where the server keeps its state: the ledger and its signing key
    /// (default $XDG_DATA_HOME/tokenmill or ~/.local/share/tokenmill).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The usage ledger directory (default DATA_DIR/ledger).
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// The ledger's private signing key (default DATA_DIR/ledger.key, made
    /// on first start when absent).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Keep no ledger: usage is then not durably recorded. Not for
    /// production.
    #[arg(long)]
    pub no_ledger: bool,
    /// The ledger's name in its signed checkpoints.
    #[arg(long, default_value = "tokenmill/ledger")]
    pub ledger_origin: String,
    /// Sign a checkpoint after this many records...
    #[arg(long, default_value_t = 10_000)]
    pub checkpoint_every: u64,
    /// ...or this many milliseconds, whichever comes first (and at
    /// shutdown).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// Publish every ledger record and checkpoint to NATS JetStream at this
    /// URL (e.g. nats://127.0.0.1:4222); records wait in the ledger while
    /// NATS is down.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Most prompt tokens per request (default: the model's context).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (default: the context).
    #[arg(long)]
    pub max_output_tokens: Option<usize>,
    /// Seconds a request may take, queueing included; then 504 and its
    /// generation is stopped (billed for what it made).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Most API requests in progress at once, streams included; more get
    /// 503 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes; more get 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The JetStream stream to publish to (made if missing).
    #[arg(long, default_value = "tokenmill-ledger")]
    pub nats_stream: String,
    /// A witness to submit every checkpoint to, as URL=KEY: its submission
    /// prefix (`/add-checkpoint` is appended) and its cosigner key (the text
    /// or a file), as `tokenmill witness key` printed it. Repeat for more
    /// witnesses. Cosignatures are kept in the ledger directory; a witness
    /// that is down is retried without holding up any request.
    #[arg(long = "witness", value_parser = parse_witness)]
    #[serde(skip)]
    pub witnesses: Vec<(String, String)>,
}

/// `URL=KEY` of `--witness`.
fn parse_witness(text: &str) -> Result<(String, String), String> {
    // The URL holds ':' and '/', never '='; a key text holds neither '='
    // nor white space, but base64 may end in '='.
    match text.split_once('=') {
        Some((url, key)) if !url.is_empty() && !key.is_empty() => {
            Ok((url.to_owned(), key.to_owned()))
        }
        _ => Err(format!("{text:?} is not URL=KEY")),
    }
}

/// `serve`'s flags, checked: every duration a positive number, the engine's
/// sizes possible, the model found.
#[derive(Debug)]
pub struct ServeSettings {
    /// The model and the engine's sizes.
    pub engine: EngineSettings,
    /// `host:port` to listen on.
    pub address: String,
    /// Most requests accepted and not finished.
    pub max_in_flight: usize,
    /// Length of a capacity record's interval.
    pub capacity_interval: Duration,
    /// How long requests in flight get to finish at shutdown.
    pub drain_timeout: Duration,
    /// The server's limits on requests.
    pub limits: Limits,
}

/// A positive, finite number of seconds, or an error naming `flag`.
fn positive_seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value > 0.0 && value.is_finite()) {
        bail!("--{flag} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

impl ServeArgs {
    /// Checks the flags that need more than their type.
    pub fn settings(&self) -> anyhow::Result<ServeSettings> {
        let engine = self.engine.settings(self.seed)?;
        let capacity_interval = positive_seconds(self.capacity_interval, "capacity-interval")?;
        let request_timeout = positive_seconds(self.request_timeout, "request-timeout")?;
        if !(self.drain_timeout >= 0.0 && self.drain_timeout.is_finite()) {
            bail!("--drain-timeout must be a number of seconds, 0 or more");
        }
        Ok(ServeSettings {
            engine,
            address: format!("{}:{}", self.host, self.port),
            max_in_flight: self.max_in_flight,
            capacity_interval,
            drain_timeout: Duration::from_secs_f64(self.drain_timeout),
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_prompt_tokens: self.max_prompt_tokens,
                max_output_tokens: self.max_output_tokens,
                request_timeout,
                max_concurrent_requests: self.max_concurrent_requests,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn settings(args: &[&str]) -> anyhow::Result<ServeSettings> {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let mut argv = vec!["serve", "--model", model];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.serve.settings()
    }

    #[test]
    fn flags_become_settings() {
        let s = settings(&[
            "--port",
            "9",
            "--request-timeout",
            "1.5",
            "--drain-timeout",
            "0",
        ])
        .unwrap();
        assert_eq!(s.address, "127.0.0.1:9");
        assert_eq!(s.limits.request_timeout, Duration::from_millis(1500));
        assert_eq!(s.drain_timeout, Duration::ZERO);
        assert_eq!(s.engine.num_blocks, 32768 / 16);
    }

    #[test]
    fn durations_that_are_not_positive_name_their_flag() {
        for (flag, value) in [
            ("--capacity-interval", "0"),
            ("--request-timeout", "-1"),
            ("--request-timeout", "inf"),
            ("--drain-timeout", "-0.5"),
        ] {
            let arg = format!("{flag}={value}");
            let err = settings(&[&arg]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn the_engine_flags_are_checked_here_too() {
        let err = settings(&["--block-size", "0"]).unwrap_err().to_string();
        assert!(err.contains("--block-size"), "{err}");
    }
}
