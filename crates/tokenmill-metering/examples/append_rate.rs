//! Durable records per second with group commit.
//!
//! `cargo run --release -p tokenmill-metering --example append_rate -- [records] [producers] [window] [dir]`
//!
//! Producer threads append usage records as the engine would, each keeping
//! at most `window` records in flight (the server's concurrent requests); a
//! record counts once its callback reports it durable (written and
//! fdatasync'ed). The ledger uses its defaults: 64 MiB segments and a signed
//! checkpoint every 10,000 records or second. Then the ledger is closed and
//! verified, and both times are printed. Defaults: 1,000,000 records, 2
//! producers, 20,000 in flight each, a temporary directory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokenmill_metering::{verify, Ledger, LedgerConfig, RecordBody, Signer};
use tokenmill_protocol::{FinishReason, KeyId, RequestId, TenantId, TokenCounts, UsageEvent};

fn usage(n: u64) -> UsageEvent {
    let arrived = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + n);
    UsageEvent {
        request_id: RequestId(format!("chatcmpl-{n:016x}")),
        tenant: TenantId(format!("tenant-{}", n % 16)),
        key_id: KeyId(format!("key-{}", n % 64)),
        model: "SmolLM2-135M-Instruct".into(),
        tokens: TokenCounts {
            prompt_tokens: 100 + n % 900,
            cached_prompt_tokens: n % 64,
            completion_tokens: 1 + n % 512,
        },
        finish_reason: FinishReason::Stop,
        device_seconds: 0.0001 * (n % 1000) as f64,
        arrived_at: arrived,
        finished_at: arrived + Duration::from_millis(300),
    }
}

/// How many records a producer has in flight, and a way to wait for room.
struct Window {
    in_flight: Mutex<u64>,
    room: Condvar,
    limit: u64,
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let records: u64 = arg(&args, 1, 1_000_000);
    let producers: u64 = arg(&args, 2, 2).max(1);
    let window: u64 = arg(&args, 3, 20_000).max(1);
    let tmp = tempfile::tempdir()?;
    let dir = args
        .get(4)
        .map_or_else(|| tmp.path().to_owned(), Into::into);

    let signer = Signer::from_seed("append-rate", [42; 32])?;
    let verifier = signer.verifier();
    let (ledger, report) =
        Ledger::open(LedgerConfig::new(&dir, "tokenmill.example/bench"), signer)?;
    let first = report.records;
    let ledger = Arc::new(ledger);
    let durable = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let per = records / producers;
    let total = per * producers;

    let start = Instant::now();
    let threads: Vec<_> = (0..producers)
        .map(|p| {
            let ledger = Arc::clone(&ledger);
            let durable = Arc::clone(&durable);
            let done_tx = done_tx.clone();
            std::thread::spawn(move || {
                let win = Arc::new(Window {
                    in_flight: Mutex::new(0),
                    room: Condvar::new(),
                    limit: window,
                });
                for i in 0..per {
                    {
                        let mut n = win.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                        while *n >= win.limit {
                            n = win.room.wait(n).unwrap_or_else(|e| e.into_inner());
                        }
                        *n += 1;
                    }
                    let (win, durable, done_tx) =
                        (Arc::clone(&win), Arc::clone(&durable), done_tx.clone());
                    ledger.append(
                        &RecordBody::Usage(usage(p * per + i)),
                        Box::new(move |r| {
                            if r.is_err() {
                                eprintln!("append failed: {r:?}");
                                return;
                            }
                            let mut n = win.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                            *n -= 1;
                            if *n + 1 == win.limit {
                                win.room.notify_one();
                            }
                            if durable.fetch_add(1, Ordering::Relaxed) + 1 == total {
                                let _ = done_tx.send(());
                            }
                        }),
                    );
                }
            })
        })
        .collect();
    drop(done_tx);
    for t in threads {
        t.join().map_err(|_| "producer panicked")?;
    }
    done_rx.recv()?;
    let elapsed = start.elapsed();

    let closing = Instant::now();
    let closed = Arc::try_unwrap(ledger)
        .map_err(|_| "ledger still shared")?
        .close()?;
    let close_time = closing.elapsed();
    let bytes: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();

    let verifying = Instant::now();
    let v = verify(&dir, &[verifier])?;
    let verify_time = verifying.elapsed();

    println!(
        "{} durable records in {:.3} s: {:.0} records/s ({} producers, {} in flight each)",
        total,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        producers,
        window
    );
    println!(
        "ledger: {} records ({} before), {} checkpoints, {:.1} MiB, {:.0} bytes/record; close {:.1} ms",
        closed.records,
        first,
        v.checkpoints,
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / closed.records.max(1) as f64,
        close_time.as_secs_f64() * 1e3
    );
    println!(
        "verify: {} records in {:.3} s: {:.0} records/s",
        v.records,
        verify_time.as_secs_f64(),
        v.records as f64 / verify_time.as_secs_f64()
    );
    Ok(())
}
