//! `tokenmill witness`: run a witness that cosigns ledger checkpoints
//! (C2SP tlog-witness), and make its key. The hardware backer runs it; the
//! cloud's servers submit their checkpoints to it.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenmill_metering::cosignature::Cosigner;
use tokenmill_metering::keys::{self, Signer, VerifierKey};
use tokenmill_witness::store::Store;
use tokenmill_witness::Witness;

/// `tokenmill witness`.
#[derive(Args, Debug)]
pub struct WitnessArgs {
    #[command(subcommand)]
    command: WitnessCommand,
}

#[derive(Subcommand, Debug)]
enum WitnessCommand {
    /// Serve `POST /add-checkpoint` until SIGINT or SIGTERM.
    Serve(ServeWitness),
    /// Make a witness key: DIR/witness.key (private, mode 0600) and
    /// DIR/witness.vkey (the cosigner key verifiers pass as --witness-key).
    Key(KeyArgs),
}

#[derive(Args, Debug)]
struct ServeWitness {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7380")]
    listen: String,
    /// The witness's private key file (made by `tokenmill witness key`).
    #[arg(long)]
    key: PathBuf,
    /// Where the witness keeps the latest checkpoint it cosigned per log;
    /// losing it lets the witness cosign a rewritten history, so keep it
    /// on durable storage.
    #[arg(long)]
    state: PathBuf,
    /// A log to witness: its origin (the server's --ledger-origin) and the
    /// public key that signs its checkpoints, as ORIGIN=KEY where KEY is a
    /// public key file or the key text itself. Repeat for more logs or keys.
    #[arg(long = "log", required = true, value_parser = parse_log)]
    logs: Vec<(String, String)>,
}

#[derive(Args, Debug)]
struct KeyArgs {
    /// The witness's name (a schema-less URL, e.g. backer.example/witness).
    #[arg(long)]
    name: String,
    /// The directory to write the key files to.
    #[arg(long)]
    dir: PathBuf,
}

fn parse_log(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((origin, key)) if !origin.is_empty() && !key.is_empty() => {
            Ok((origin.to_owned(), key.to_owned()))
        }
        _ => Err(format!("{text:?} is not ORIGIN=KEY")),
    }
}

/// A log's key given as a file or as its text.
fn log_key(key: &str) -> anyhow::Result<VerifierKey> {
    let path = Path::new(key);
    if path.is_file() {
        return keys::load_verifier(path).with_context(|| format!("reading {}", path.display()));
    }
    VerifierKey::parse(key)
        .with_context(|| format!("--log key {key:?} is neither a file nor a key"))
}

/// Runs `witness`.
pub fn run(args: WitnessArgs) -> anyhow::Result<()> {
    match args.command {
        WitnessCommand::Serve(args) => serve(args),
        WitnessCommand::Key(args) => make_key(args),
    }
}

fn serve(args: ServeWitness) -> anyhow::Result<()> {
    let signer = keys::load_signer(&args.key)
        .with_context(|| format!("loading the witness key {}", args.key.display()))?;
    let mut logs: HashMap<String, Vec<VerifierKey>> = HashMap::new();
    for (origin, key) in &args.logs {
        logs.entry(origin.clone()).or_default().push(log_key(key)?);
    }
    let store = Store::open(&args.state)
        .with_context(|| format!("opening the witness state {}", args.state.display()))?;
    let witness = Arc::new(Witness::new(Cosigner::from_signer(&signer), logs, store));
    tracing::info!(key = %witness.public_key().to_text(), "witness key");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!("witness listening on http://{}", args.listen);
        tokenmill_witness::http::serve(listener, witness, crate::serve::shutdown_signal())
            .await
            .context("serving")
    })
}

fn make_key(args: KeyArgs) -> anyhow::Result<()> {
    let signer = Signer::generate(&args.name)?;
    let cosigner_key = Cosigner::from_signer(&signer).public().to_text();
    std::fs::create_dir_all(&args.dir).with_context(|| format!("making {}", args.dir.display()))?;
    let private = args.dir.join("witness.key");
    let public = args.dir.join("witness.vkey");
    if private.exists() || public.exists() {
        bail!("{} already holds a witness key", args.dir.display());
    }
    write_new(&private, &format!("{}\n", signer.to_private_text()), 0o600)?;
    write_new(&public, &format!("{cosigner_key}\n"), 0o644)?;
    println!("{cosigner_key}");
    Ok(())
}

/// Writes a new file (never over an existing one), synced.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
