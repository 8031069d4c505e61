//! The tokenmill binary.

mod serve;
mod tenants;
mod usage_log;

use clap::{Parser, Subcommand};

/// tokenmill: an OpenAI-compatible inference server that meters every token.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API.
    Serve(serve::ServeArgs),
    /// Manage tenants and their API keys.
    Tenants(tenants::TenantsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Tenants(args) => tenants::run(args),
    }
}
