//! `serve`'s configuration in layers: defaults < a TOML file (`--config`) <
//! environment (`TOKENMILL_<FLAG>`, e.g. `TOKENMILL_MAX_NUM_SEQS`) < flags.
//!
//! The file's keys are the flags' names (`max_num_seqs` or `max-num-seqs`).
//! A key that names no flag is an error, not ignored: a typo in a
//! production config must not silently fall back to a default. A file value
//! is used only where neither a flag nor the environment set one, by
//! writing it into the command line in front of the user's own arguments
//! and parsing again, so clap applies one set of rules to every layer.

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};
use std::ffi::OsString;
use std::path::Path;

/// Adds `TOKENMILL_<NAME>` environment variables to every flag of `command`.
pub fn with_env(command: Command) -> Command {
    command.mut_args(|arg| {
        let is_flag = arg.get_long().is_some();
        let already = arg.get_env().is_some();
        if is_flag && !already && arg.get_id() != "config" && arg.get_id() != "print_config" {
            let name = format!("TOKENMILL_{}", arg.get_id().as_str().to_uppercase());
            arg.env(name)
        } else {
            arg
        }
    })
}

/// The command line with the config file's values put in for every flag
/// that neither the user nor the environment set; `None` when there is no
/// `--config`.
pub fn with_file_values(
    command: &Command,
    matches: &ArgMatches,
    argv: &[OsString],
    subcommand: &str,
) -> anyhow::Result<Option<Vec<OsString>>> {
    let Some(path) = matches.get_one::<std::path::PathBuf>("config") else {
        return Ok(None);
    };
    let table = load(path)?;
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
        else {
            bail!(
                "{}: unknown key {key:?} (keys are `serve` flags)",
                path.display()
            );
        };
        if id == "config" || id == "print_config" {
            bail!(
                "{}: {key:?} cannot be set in the config file",
                path.display()
            );
        }
        if matches.value_source(&id) != Some(ValueSource::DefaultValue)
            && matches.value_source(&id).is_some()
        {
            continue; // a flag or the environment wins
        }
        let long = arg.get_long().unwrap_or(&id);
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(true) if !takes_value => injected.push(format!("--{long}").into()),
            toml::Value::Boolean(false) if !takes_value => {}
            other => injected.push(format!("--{long}={}", scalar(path, key, other)?).into()),
        }
    }
    let Some(at) = argv.iter().position(|a| a == subcommand) else {
        bail!("cannot find the `{subcommand}` subcommand in the command line");
    };
    let mut out = argv[..=at].to_vec();
    out.extend(injected);
    out.extend_from_slice(&argv[at + 1..]);
    Ok(Some(out))
}

fn load(path: &Path) -> anyhow::Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("parsing {}", path.display()))
}

/// A TOML value as a flag's text.
fn scalar(path: &Path, key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| scalar(path, key, v))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        _ => bail!(
            "{}: {key:?} must be a string, number, boolean or list",
            path.display()
        ),
    })
}
