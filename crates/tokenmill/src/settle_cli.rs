//! `tokenmill settle`: a month's revenue-share statement from a verified
//! ledger and a contract (docs/contract.md).

use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tokenmill_metering::keys::{self, VerifierKey};
use tokenmill_settlement::{render, settle, source, Contract, Month};

/// Flags of `tokenmill settle`.
#[derive(Args, Debug)]
pub struct SettleArgs {
    /// The contract file (TOML).
    #[arg(long)]
    contract: PathBuf,
    /// The ledger directory; it must verify, or nothing is settled.
    #[arg(long)]
    ledger: PathBuf,
    /// Public key files; any of them may have signed (key rotation).
    #[arg(long = "public-key", required = true)]
    public_keys: Vec<PathBuf>,
    /// Witness keys (files, as `tokenmill witness key` writes them): settle
    /// only on checkpoints that --min-cosigners of these witnesses
    /// cosigned; the statement names the checkpoint and its cosigners.
    #[arg(long = "witness-key")]
    witness_keys: Vec<PathBuf>,
    /// With --witness-key: the cosignatures a checkpoint needs (default 1).
    #[arg(long, default_value_t = 1, requires = "witness_keys")]
    min_cosigners: usize,
    /// The month to settle, YYYY-MM.
    #[arg(long)]
    period: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// A readable table.
    Table,
    /// The statement as JSON.
    Json,
    /// One CSV row per line of the statement.
    Csv,
}

/// Runs `settle`.
pub fn run(args: SettleArgs) -> anyhow::Result<()> {
    let period = Month::parse(&args.period).map_err(|m| anyhow::anyhow!("--period: {m}"))?;
    let contract = Contract::load(&args.contract)?;
    let keys: Vec<VerifierKey> = args
        .public_keys
        .iter()
        .map(|p| keys::load_verifier(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let ledger = if args.witness_keys.is_empty() {
        source::load(&args.ledger, &keys)?
    } else {
        let witnesses = crate::ledger_cli::load_witness_keys(&args.witness_keys)?;
        source::load_witnessed(&args.ledger, &keys, &witnesses, args.min_cosigners)?
    };
    let statement = settle(&contract, &ledger, period)?;
    let text = match args.format {
        Format::Table => render::text(&statement),
        Format::Json => render::json(&statement),
        Format::Csv => render::csv(&statement),
    };
    match args.out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(())
}
