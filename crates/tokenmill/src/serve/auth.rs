//! Who may call the API: the tenants file's keys (re-read on SIGHUP), or
//! nobody checked at all with `--no-auth`.

use super::args::ServeArgs;
use anyhow::bail;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenmill_server::tenants::{KeyRegistry, LiveKeys, TenantsFile};
use tokenmill_server::Auth;

/// How requests are authenticated, from the flags.
pub fn auth(args: &ServeArgs) -> anyhow::Result<Auth> {
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
pub async fn reload_keys_on_hangup(keys: Arc<LiveKeys>, path: PathBuf) {
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
