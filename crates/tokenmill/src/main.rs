//! The tokenmill binary.

mod bench;
mod config;
mod device;
mod engine_args;
mod gpu_cli;
mod ledger_cli;
mod ledger_metrics;
mod model_cli;
mod serve;
mod settle_cli;
mod tenants;
mod usage_log;
mod witness_cli;

use clap::{Command as ClapCommand, CommandFactory, FromArgMatches, Parser, Subcommand};

/// tokenmill: an OpenAI-compatible inference server that meters every token.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text or as one JSON object each (to stderr; the level
    /// comes from RUST_LOG, default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TOKENMILL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API.
    Serve(Box<serve::ServeArgs>),
    /// Manage tenants and their API keys.
    Tenants(tenants::TenantsArgs),
    /// The signed usage ledger: keys, verification, export, proofs.
    Ledger(ledger_cli::LedgerArgs),
    /// Benchmark a server (any OpenAI-compatible one) or the engine:
    /// latency percentiles, throughput, goodput, JSON and plots.
    Bench(bench::BenchArgs),
    /// A month's revenue-share statement from a verified ledger and a
    /// contract (docs/contract.md).
    Settle(settle_cli::SettleArgs),
    /// Model tools for checks against other implementations: random
    /// weights as safetensors, logits as JSON.
    Model(model_cli::ModelArgs),
    /// Checks that need a GPU: each CUDA kernel against its CPU reference.
    Gpu(gpu_cli::GpuArgs),
    /// A witness that cosigns ledger checkpoints only if they extend the
    /// last ones it cosigned (run by the backer, not the cloud).
    Witness(witness_cli::WitnessArgs),
}

/// Parses the command line, with `serve`'s environment variables and config
/// file applied (see [`config`]).
fn parse() -> anyhow::Result<Cli> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = Cli::command().mut_subcommand("serve", config::with_env);
    let matches = command.clone().get_matches_from(&argv);
    if let Some(serve) = matches.subcommand_matches("serve") {
        let serve_command = command
            .find_subcommand("serve")
            .cloned()
            .unwrap_or_else(|| ClapCommand::new("serve"));
        if let Some(argv) = config::with_file_values(&serve_command, serve, &argv, "serve")? {
            let matches = command.get_matches_from(&argv);
            return Ok(Cli::from_arg_matches(&matches)?);
        }
    }
    Ok(Cli::from_arg_matches(&matches)?)
}

fn main() -> anyhow::Result<()> {
    let cli = parse()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Tenants(args) => tenants::run(args),
        Command::Ledger(args) => ledger_cli::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Settle(args) => settle_cli::run(args),
        Command::Model(args) => model_cli::run(args),
        Command::Gpu(args) => gpu_cli::run(args),
        Command::Witness(args) => witness_cli::run(args),
    }
}
