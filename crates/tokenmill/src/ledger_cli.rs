//! `tokenmill ledger`: keys, offline verification, export, import and
//! proofs of the signed usage ledger (see docs/ledger-format.md).

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenmill_metering::cosignature::CosignerKey;
use tokenmill_metering::keys::{self, VerifierKey};
use tokenmill_metering::proof::{self, ConsistencyProof, InclusionProof};
use tokenmill_metering::witnessed;

/// Flags of `tokenmill ledger`.
#[derive(Args, Debug)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Make a signing key: DIR/ledger.key (private, mode 0600) and
    /// DIR/ledger.pub (the public key in signed-note verifier format).
    Keygen {
        /// Where to write the two files.
        #[arg(long)]
        out: PathBuf,
        /// The key's name in signatures.
        #[arg(long, default_value = "tokenmill")]
        name: String,
    },
    /// Check every record's chain link and every checkpoint's signature and
    /// root; on a problem, exit non-zero naming the first bad record.
    Verify {
        /// The ledger directory.
        dir: PathBuf,
        /// Public key files; any of them may have signed (key rotation).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        /// Witness keys (files, as `tokenmill witness key` writes them):
        /// also check the cosignatures kept beside the checkpoints, and
        /// report the latest checkpoint each witness cosigned.
        #[arg(long = "witness-key")]
        witness_keys: Vec<PathBuf>,
        /// With --witness-key: fail unless the last checkpoint of the
        /// ledger is cosigned by at least this many of those witnesses.
        #[arg(long, default_value_t = 0)]
        min_cosigners: usize,
    },
    /// Write every record for other tools.
    Export {
        /// The ledger directory.
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write each signed checkpoint (as a `checkpoint` line after
        /// the last record it covers), so that `ledger import` can rebuild
        /// a ledger that verifies with the original keys.
        #[arg(long)]
        checkpoints: bool,
    },
    /// Rebuild a ledger from `ledger export --checkpoints` JSON lines; every
    /// record must hash as its line says and the result must verify.
    Import {
        /// The JSON lines file.
        file: PathBuf,
        /// The (new, empty) directory to rebuild the ledger in.
        #[arg(long)]
        out: PathBuf,
        /// The ledger's origin (the first line of its checkpoints).
        #[arg(long)]
        origin: Option<String>,
        /// Public key files that signed the checkpoints.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
    },
    /// Write a proof that a record is in a signed checkpoint, or that an
    /// older checkpoint is a prefix of a newer one; the checkpoint notes
    /// it refers to are written next to it (`OUT.checkpoint`,
    /// `OUT.old-checkpoint`).
    Prove {
        /// The ledger directory.
        dir: PathBuf,
        /// Prove that this record (by sequence number) is included.
        #[arg(long, conflicts_with = "consistency")]
        record: Option<u64>,
        /// Prove that the checkpoint of size OLD is a prefix of the one of
        /// size NEW.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
        consistency: Option<Vec<u64>>,
        /// For --record: the checkpoint (tree size) to prove against;
        /// default the latest.
        #[arg(long)]
        tree_size: Option<u64>,
        /// Public key files, to pick verified checkpoints.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        /// The proof file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a ledger from a NATS JetStream stream the server published
    /// to; it must verify like the original.
    Pull {
        /// The NATS URL.
        #[arg(long)]
        nats: String,
        /// The stream name.
        #[arg(long)]
        stream: String,
        /// The (new, empty) directory to rebuild the ledger in.
        #[arg(long)]
        out: PathBuf,
        /// Public key files that signed the checkpoints.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
    },
    /// Check a proof with checkpoints and public keys alone (no ledger).
    CheckProof {
        /// The proof file.
        proof: PathBuf,
        /// The signed checkpoint the proof ends at.
        #[arg(long)]
        checkpoint: PathBuf,
        /// For a consistency proof: the older signed checkpoint.
        #[arg(long)]
        old_checkpoint: Option<PathBuf>,
        /// Public key files.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExportFormat {
    /// One JSON object per record.
    Jsonl,
}

/// Runs a `ledger` command.
pub fn run(args: LedgerArgs) -> anyhow::Result<()> {
    match args.command {
        LedgerCommand::Keygen { out, name } => {
            let files = keys::generate_key_files(&out, &name)?;
            eprintln!(
                "wrote {} (private, mode 0600) and {}",
                files.private.display(),
                files.public.display()
            );
            println!("{}", files.verifier);
        }
        LedgerCommand::Verify {
            dir,
            public_keys,
            witness_keys,
            min_cosigners,
        } => {
            let keys = load_keys(&public_keys)?;
            let verified = tokenmill_metering::verify(&dir, &keys);
            match verified {
                Ok(report) => {
                    println!(
                        "ok: {} records in {} segments, {} checkpoints; root {}; {} records after the last checkpoint",
                        report.records,
                        report.segments,
                        report.checkpoints,
                        report.root,
                        report.unsigned_records
                    );
                    for file in &report.set_aside_files {
                        println!("note: torn tail set aside in {}", file.display());
                    }
                }
                Err(problem) => bail!("ledger verification failed: {problem}"),
            }
            if !witness_keys.is_empty() {
                check_cosignatures(&dir, &keys, &witness_keys, min_cosigners)?;
            } else if min_cosigners > 0 {
                bail!("--min-cosigners needs the witnesses' keys (--witness-key)");
            }
        }
        LedgerCommand::Export {
            dir,
            format,
            out,
            checkpoints,
        } => {
            let ExportFormat::Jsonl = format;
            let export = if checkpoints {
                tokenmill_metering::export_jsonl_with_checkpoints
            } else {
                tokenmill_metering::export_jsonl
            };
            let report = match out {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(
                        std::fs::File::create(&path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    );
                    let report = export(&dir, &mut file)?;
                    file.flush()?;
                    report
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut lock = stdout.lock();
                    export(&dir, &mut lock)?
                }
            };
            eprintln!("exported {report:?}");
        }
        LedgerCommand::Import {
            file,
            out,
            origin,
            public_keys,
        } => {
            let keys = load_keys(&public_keys)?;
            let origin = match origin {
                Some(o) => o,
                None => first_origin(&file)?,
            };
            let input = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let report = tokenmill_metering::import_jsonl(
                &mut std::io::BufReader::new(input),
                tokenmill_metering::LedgerConfig::new(&out, origin),
                &keys,
            )
            .with_context(|| format!("importing {}", file.display()))?;
            println!(
                "ok: {} records and {} checkpoints rebuilt in {}; root {}",
                report.records,
                report.checkpoints,
                out.display(),
                report.root
            );
        }
        LedgerCommand::Prove {
            dir,
            record,
            consistency,
            tree_size,
            public_keys,
            out,
        } => {
            let keys = load_keys(&public_keys)?;
            let checkpoints = tokenmill_metering::verified_checkpoints(&dir, &keys)?;
            let note_of = |size: u64| {
                checkpoints
                    .iter()
                    .find(|(_, c)| c.checkpoint.size == size)
                    .map(|(_, c)| c.note.clone())
                    .with_context(|| format!("no signed checkpoint of size {size}"))
            };
            match (record, consistency.as_deref()) {
                (Some(seq), None) => {
                    let size = match tree_size {
                        Some(size) => size,
                        None => checkpoints
                            .last()
                            .map(|(_, c)| c.checkpoint.size)
                            .context("the ledger has no signed checkpoint yet")?,
                    };
                    let proof = proof::prove_inclusion(&dir, seq, size)?;
                    write(&out, &proof.to_text())?;
                    write(&with_suffix(&out, "checkpoint"), &note_of(size)?)?;
                }
                (None, Some(&[old, new])) => {
                    let proof = proof::prove_consistency(&dir, old, new)?;
                    write(&out, &proof.to_text())?;
                    write(&with_suffix(&out, "old-checkpoint"), &note_of(old)?)?;
                    write(&with_suffix(&out, "checkpoint"), &note_of(new)?)?;
                }
                _ => bail!("give --record SEQ or --consistency OLD NEW"),
            }
            eprintln!("wrote {}", out.display());
        }
        LedgerCommand::Pull {
            nats,
            stream,
            out,
            public_keys,
        } => {
            let keys = load_keys(&public_keys)?;
            let report = tokenmill_nats::pull_blocking(&nats, &stream, &out, &keys)
                .with_context(|| format!("pulling stream {stream} from {nats}"))?;
            println!(
                "ok: {} records and {} checkpoints rebuilt in {}; root {}",
                report.records,
                report.checkpoints,
                out.display(),
                report.verify.root
            );
        }
        LedgerCommand::CheckProof {
            proof,
            checkpoint,
            old_checkpoint,
            public_keys,
        } => {
            let keys = load_keys(&public_keys)?;
            let text = read(&proof)?;
            let note = read(&checkpoint)?;
            match old_checkpoint {
                None => {
                    let (record, cp) = InclusionProof::parse(&text)?.check(&note, &keys)?;
                    println!(
                        "ok: record {} is in the checkpoint of {} records of {}",
                        record.seq, cp.size, cp.origin
                    );
                }
                Some(old) => {
                    let old_note = read(&old)?;
                    let (old, new) =
                        ConsistencyProof::parse(&text)?.check(&old_note, &note, &keys)?;
                    println!(
                        "ok: the checkpoint of {} records is a prefix of the one of {} records",
                        old.size, new.size
                    );
                }
            }
        }
    }
    Ok(())
}

/// The origin of the first checkpoint line of an export (the importer
/// needs it before it reads the records).
fn first_origin(file: &Path) -> anyhow::Result<String> {
    use std::io::BufRead;
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    for line in std::io::BufReader::new(input).lines() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value.get("type").and_then(|t| t.as_str()) == Some("checkpoint") {
            if let Some(origin) = value
                .get("note")
                .and_then(|n| n.as_str())
                .and_then(|n| n.lines().next())
            {
                return Ok(origin.to_owned());
            }
        }
    }
    bail!(
        "{} has no checkpoint line: export with --checkpoints, or give --origin",
        file.display()
    )
}

fn load_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<VerifierKey>> {
    paths
        .iter()
        .map(|p| keys::load_verifier(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Reads witness keys (cosigner key files).
pub fn load_witness_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<CosignerKey>> {
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            CosignerKey::parse(text.trim())
                .with_context(|| format!("{} is not a witness key", p.display()))
        })
        .collect()
}

/// Checks the cosignatures of `dir` and prints, per witness, the latest
/// checkpoint it cosigned; fails if the last checkpoint of the ledger lacks
/// `min_cosigners` of them.
fn check_cosignatures(
    dir: &std::path::Path,
    keys: &[VerifierKey],
    witness_paths: &[PathBuf],
    min_cosigners: usize,
) -> anyhow::Result<()> {
    let witnesses = load_witness_keys(witness_paths)?;
    let witnessed = witnessed::witnessed_checkpoints(dir, keys, &witnesses)
        .map_err(|problem| anyhow::anyhow!("cosignature verification failed: {problem}"))?;
    for witness in &witnesses {
        let latest = witnessed
            .iter()
            .rev()
            .find(|w| w.cosigned_by.iter().any(|c| c.witness == witness.name()));
        match latest {
            Some(w) => println!(
                "cosigned: {} cosigned size {} (root {})",
                witness.name(),
                w.checkpoint.size,
                w.checkpoint.root
            ),
            None => println!("cosigned: {} cosigned no checkpoint", witness.name()),
        }
    }
    if min_cosigners > 0 {
        let last = tokenmill_metering::verified_checkpoints(dir, keys)?
            .into_iter()
            .last()
            .map(|(_, v)| v.checkpoint);
        let Some(last) = last else {
            bail!("the ledger has no checkpoint to be cosigned");
        };
        let cosigners = witnessed
            .iter()
            .find(|w| w.checkpoint == last)
            .map_or(0, |w| w.cosigned_by.len());
        if cosigners < min_cosigners {
            bail!(
                "the last checkpoint (size {}) has {cosigners} of the {min_cosigners} cosignatures asked for",
                last.size
            );
        }
    }
    Ok(())
}
