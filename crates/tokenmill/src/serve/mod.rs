//! `tokenmill serve`: load a model, start the engine, serve the API.
//!
//! [`args`] reads and checks the flags, [`auth`] the keys, [`ledger`] opens
//! where usage goes, [`lifecycle`] drains at shutdown; [`run`] puts them
//! together in order.

mod args;
mod auth;
mod ledger;
mod lifecycle;

pub use args::ServeArgs;
pub use lifecycle::shutdown_signal;

use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenmill_engine::Engine;
use tokenmill_server::telemetry::TenantLabels;
use tokenmill_server::{AppState, Auth};

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_config {
        let text = toml::to_string_pretty(&args).context("printing the configuration")?;
        println!("{}", text.trim_end());
        return Ok(());
    }
    let settings = args.settings()?;
    let auth = auth::auth(&args)?;
    let open_ledger = ledger::open_ledger(&args)?;
    let exporter = ledger::start_export(&args, open_ledger.as_ref())?.map(Arc::new);
    let submitter = ledger::witness_submitter(&args, open_ledger.as_ref())?
        .map(|s| Arc::new(tokio::sync::Mutex::new(s)));
    let ledger = open_ledger.map(|open| open.ledger);
    let meter = ledger::meter(&args, ledger.clone())?;

    let engine_settings = &settings.engine;
    let (device, device_name) = engine_settings.open_device()?;
    let started = Instant::now();
    let model = engine_settings.load(&device, false)?;
    let cfg = model.model.config().clone();
    tracing::info!(
        model = %engine_settings.served_name,
        path = %engine_settings.model_path.display(),
        architecture = %cfg.architecture,
        random_weights = engine_settings.random_weights.is_some(),
        layers = cfg.num_layers,
        context = cfg.context_length,
        device = %device_name,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded on {device_name}"
    );
    let engine = Arc::new(Engine::start(
        model,
        &engine_settings.served_name,
        engine_settings.engine_config(
            &device_name,
            settings.max_in_flight,
            settings.capacity_interval,
        ),
        meter,
    )?);

    let metrics = lifecycle::install_metrics()?;
    let tenant_labels = if args.metrics_tenant_label.is_empty() {
        TenantLabels::default()
    } else {
        TenantLabels::allow(args.metrics_tenant_label.clone())
    };
    let live_keys = match &auth {
        Auth::Keys(keys) => Some(Arc::clone(keys)),
        Auth::Disabled => None,
    };
    let state = AppState::new(engine.clone(), settings.limits.clone(), auth)
        .with_metrics(metrics.clone(), tenant_labels);
    let lifecycle = state.lifecycle();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let address = &settings.address;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        tracing::info!("listening on http://{address}");
        if let Some(keys) = live_keys {
            tokio::spawn(auth::reload_keys_on_hangup(keys, args.tenants.clone()));
        }
        tokio::spawn(crate::ledger_metrics::publish(
            ledger.clone(),
            exporter.clone(),
            Duration::from_secs(1),
        ));
        if let Some(submitter) = submitter.clone() {
            tokio::spawn(async move {
                loop {
                    submitter.lock().await.round().await;
                    tokio::time::sleep(WITNESS_POLL).await;
                }
            });
        }
        // Histograms are aggregated by the exporter's upkeep; run it often
        // enough that a scrape never waits on a backlog.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tokenmill_server::serve(listener, state, async {
            let _ = stopped.await;
        }));
        lifecycle::shutdown_signal().await;
        lifecycle::drain(&engine, &lifecycle, settings.drain_timeout).await;
        // Every request has its end now; connections close once their last
        // bytes are out.
        let _ = stop.send(());
        server.await.context("the server task failed")??;
        tracing::info!("server stopped");
        anyhow::Ok(())
    })?;
    // Ends the background tasks (metrics upkeep, ledger gauges) and the
    // handles they hold.
    drop(runtime);
    // The last handle: the engine thread writes its final capacity record
    // and exits.
    drop(engine);
    ledger::close(ledger, exporter)?;
    if let Some(submitter) = submitter {
        last_witness_round(&submitter);
    }
    Ok(())
}

/// How often the witnesses are offered the latest checkpoint.
const WITNESS_POLL: Duration = Duration::from_secs(1);

/// Offers the ledger's final checkpoint to every witness, for at most a few
/// seconds: a witness that is down then gets it from the next start.
fn last_witness_round(submitter: &tokio::sync::Mutex<tokenmill_witness::submit::Submitter>) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        let round = async {
            let mut submitter = submitter.lock().await;
            submitter.retry_now();
            submitter.round().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), round)
            .await
            .is_err()
        {
            tracing::warn!("the final checkpoint did not reach every witness in time");
        }
    });
}
