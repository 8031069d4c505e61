//! `tokenmill tenants`: manage tenants and their API keys.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tokenmill_server::tenants::TenantsFile;

/// Flags of `tokenmill tenants`.
#[derive(Args, Debug)]
pub struct TenantsArgs {
    /// The tenants file.
    #[arg(
        long,
        global = true,
        default_value = "tenants.toml",
        env = "TOKENMILL_TENANTS"
    )]
    file: PathBuf,
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand, Debug)]
enum TenantsCommand {
    /// Make a new API key for NAME (adding the tenant if it is new) and print
    /// it once; only its hash is stored.
    Add {
        /// The tenant's name, as usage is billed to it.
        name: String,
        /// The tenant's fair share against other tenants (default 1 for a
        /// new tenant; unchanged for an existing one).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// List tenants, their weights and key ids.
    List,
}

/// Runs a `tenants` command.
pub fn run(args: TenantsArgs) -> anyhow::Result<()> {
    match args.command {
        TenantsCommand::Add { name, weight } => {
            let mut file = TenantsFile::load_or_empty(&args.file)?;
            let key = file.add_key(&name, weight)?;
            file.save(&args.file)
                .with_context(|| format!("writing {}", args.file.display()))?;
            eprintln!(
                "added key {} for tenant {:?} to {}; it is shown only now:",
                key.id,
                key.tenant,
                args.file.display()
            );
            println!("{}", key.secret);
        }
        TenantsCommand::List => {
            let file = TenantsFile::load(&args.file)?;
            for tenant in &file.tenants {
                let ids: Vec<&str> = tenant.keys.iter().map(|k| k.id.as_str()).collect();
                println!(
                    "{}\tweight {}\tkeys {}",
                    tenant.name,
                    tenant.weight,
                    ids.join(",")
                );
            }
        }
    }
    Ok(())
}
