//! Helpers shared by the integration tests: deterministic records, keys,
//! and a blocking append.
#![allow(dead_code)]

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};
use tokenmill_metering::{Ledger, LedgerConfig, LedgerError, Receipt, RecordBody, Signer};
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantCapacity, TenantId, TokenCounts,
    UsageEvent,
};

pub const ORIGIN: &str = "tokenmill.test/ledger";

pub fn signer(seed: u8) -> Signer {
    Signer::from_seed(&format!("test-key-{seed}"), [seed; 32]).expect("valid key name")
}

pub fn usage(i: u64) -> UsageEvent {
    let arrived =
        UNIX_EPOCH + Duration::new(1_700_000_000 + i, ((i * 7919) % 1_000_000_000) as u32);
    UsageEvent {
        request_id: RequestId(format!("chatcmpl-{i:08}")),
        tenant: TenantId(format!("tenant-{}", i % 3)),
        key_id: KeyId(format!("key-{}", i % 5)),
        model: "SmolLM2-135M-Instruct".into(),
        tokens: TokenCounts {
            prompt_tokens: 10 + i % 50,
            cached_prompt_tokens: i % 10,
            completion_tokens: 1 + i % 200,
        },
        finish_reason: if i % 7 == 0 {
            FinishReason::Length
        } else {
            FinishReason::Stop
        },
        device_seconds: 0.001 * (i % 100) as f64,
        arrived_at: arrived,
        finished_at: arrived + Duration::from_millis(250),
    }
}

pub fn capacity(i: u64) -> CapacityRecord {
    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 10 * i);
    CapacityRecord {
        device: "cpu".into(),
        start,
        end: start + Duration::from_secs(10),
        wall_seconds: 10.0,
        busy_seconds: 7.5,
        tokens: 1000 + i,
        tenants: vec![
            TenantCapacity {
                tenant: TenantId("tenant-0".into()),
                busy_seconds: 5.0,
                tokens: 700,
            },
            TenantCapacity {
                tenant: TenantId("tenant-1".into()),
                busy_seconds: 2.5,
                tokens: 300 + i,
            },
        ],
    }
}

/// Record `i` of a test ledger: every fifth is a capacity record.
pub fn body(i: u64) -> RecordBody {
    if i % 5 == 4 {
        RecordBody::Capacity(capacity(i))
    } else {
        RecordBody::Usage(usage(i))
    }
}

pub fn config(dir: &Path, segment_max_bytes: u64, checkpoint_every: u64) -> LedgerConfig {
    LedgerConfig {
        segment_max_bytes,
        checkpoint_every_records: checkpoint_every,
        checkpoint_interval: Duration::ZERO,
        ..LedgerConfig::new(dir, ORIGIN)
    }
}

/// Appends and waits until the record is durable.
pub fn append_wait(ledger: &Ledger, body: &RecordBody) -> Result<Receipt, LedgerError> {
    let (tx, rx) = mpsc::channel();
    ledger.append(
        body,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv().expect("callback is always called")
}

/// Appends records `from..to` (without waiting for each) and waits for all.
pub fn append_range(ledger: &Ledger, from: u64, to: u64) -> Vec<Receipt> {
    let (tx, rx) = mpsc::channel();
    for i in from..to {
        let tx = tx.clone();
        ledger.append(
            &body(i),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
    }
    drop(tx);
    rx.iter().map(|r| r.expect("durable")).collect()
}

/// Appends records `from..to` in batches of `chunk`, waiting for each batch,
/// so that count-based checkpoints fall on multiples of `chunk`.
pub fn append_chunks(ledger: &Ledger, from: u64, to: u64, chunk: u64) -> Vec<Receipt> {
    let mut out = Vec::new();
    let mut i = from;
    while i < to {
        let end = (i + chunk).min(to);
        out.extend(append_range(ledger, i, end));
        i = end;
    }
    out
}

/// Writes a closed ledger of `n` records signed by `signer(1)`, with
/// checkpoints at every multiple of `checkpoint_every` (0: only at close).
pub fn write_ledger(dir: &Path, n: u64, segment_max_bytes: u64, checkpoint_every: u64) {
    let (ledger, report) =
        Ledger::open(config(dir, segment_max_bytes, checkpoint_every), signer(1)).expect("opens");
    assert_eq!(report.records, 0);
    let chunk = if checkpoint_every == 0 {
        n.max(1)
    } else {
        checkpoint_every
    };
    let receipts = append_chunks(&ledger, 0, n, chunk);
    assert_eq!(receipts.len() as u64, n);
    let closed = ledger.close().expect("closes");
    assert_eq!(closed.records, n);
    assert_eq!(closed.last_checkpoint_size, Some(n));
}

/// The segment files of a ledger directory, in order.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// The frames of a ledger file: (offset, length including overhead).
pub fn frames(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 22;
    while pos + 4 <= data.len() {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        out.push((pos, len + 8));
        pos += len + 8;
    }
    out
}

/// A frame holding `payload`, as the ledger writes it.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    let mut out = len.to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}
