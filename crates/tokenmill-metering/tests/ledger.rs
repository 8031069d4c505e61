//! Writing, reopening, verifying, exporting, importing and proving, on real
//! files in temporary directories.

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::{mpsc, Arc};
use tokenmill_metering::proof::{self, ConsistencyProof, InclusionProof};
use tokenmill_metering::{
    export_jsonl, verified_checkpoints, verify, Importer, Ledger, LedgerConfig, LedgerError,
    LedgerReader, ProblemKind, Record, RecordBody,
};

#[test]
fn write_reopen_append_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, report) = Ledger::open(config(dir.path(), 4096, 25), signer(1)).expect("opens");
    assert_eq!(report.records, 0);
    let receipts = append_chunks(&ledger, 0, 120, 25);
    let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..120).collect::<Vec<_>>());
    assert_eq!(ledger.durable_records(), 120);
    ledger.close().expect("closes");
    assert!(matches!(ledger.close(), Err(LedgerError::Closed)));
    assert!(matches!(
        append_wait(&ledger, &body(0)),
        Err(LedgerError::Closed)
    ));

    let (ledger, report) = Ledger::open(config(dir.path(), 4096, 25), signer(1)).expect("reopens");
    assert_eq!(report.records, 120);
    assert!(report.set_aside.is_empty());
    assert!(
        report.segments > 3,
        "segments roll by size: {}",
        report.segments
    );
    let r = append_wait(&ledger, &body(120)).expect("durable");
    assert_eq!(r.seq, 120);
    let closed = ledger.close().expect("closes");
    assert_eq!(closed.records, 121);

    let keys = [signer(1).verifier()];
    let v = verify(dir.path(), &keys).expect("verifies");
    assert_eq!(v.records, 121);
    assert_eq!(v.unsigned_records, 0);
    assert_eq!(v.root, closed.root);
    assert_eq!(
        v.last_checkpoint.as_ref().map(|c| c.checkpoint.size),
        Some(121)
    );
    assert!(v.checkpoints >= 5);

    // The records read back are the records written, chained.
    let mut prev = tokenmill_metering::Hash::ZERO;
    for (i, r) in LedgerReader::open(dir.path(), 0)
        .expect("reader")
        .enumerate()
    {
        let r = r.expect("record");
        assert_eq!(r.seq, i as u64);
        assert_eq!(r.record.body, body(i as u64));
        assert_eq!(r.record.prev_hash, prev);
        prev = r.hash;
    }
    // Reading from the middle starts at the right record.
    let mut mid = LedgerReader::open(dir.path(), 77).expect("reader");
    assert_eq!(mid.next_record().expect("ok").map(|r| r.seq), Some(77));
}

#[test]
fn invalid_records_are_refused_without_harm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, _) = Ledger::open(config(dir.path(), 1 << 20, 0), signer(1)).expect("opens");
    let mut bad = usage(0);
    bad.device_seconds = f64::INFINITY;
    assert!(matches!(
        append_wait(&ledger, &RecordBody::Usage(bad)),
        Err(LedgerError::Invalid(_))
    ));
    assert!(ledger.is_healthy());
    assert_eq!(append_wait(&ledger, &body(0)).expect("durable").seq, 0);
    ledger.close().expect("closes");
    verify(dir.path(), &[signer(1).verifier()]).expect("verifies");
}

#[test]
fn concurrent_appends_from_many_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, _) = Ledger::open(config(dir.path(), 64 << 10, 1000), signer(1)).expect("opens");
    let ledger = Arc::new(ledger);
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let ledger = Arc::clone(&ledger);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let n = t * 1_000_000 + i;
                    let tx = tx.clone();
                    ledger.append(
                        &RecordBody::Usage(usage(n)),
                        Box::new(move |r| {
                            let _ = tx.send((t, i, r.expect("durable")));
                        }),
                    );
                }
            })
        })
        .collect();
    drop(tx);
    for t in threads {
        t.join().expect("thread");
    }
    let results: Vec<_> = rx.iter().collect();
    assert_eq!(results.len(), 8000);
    let seqs: HashSet<u64> = results.iter().map(|(_, _, r)| r.seq).collect();
    assert_eq!(seqs, (0..8000).collect());
    // Each thread's records got increasing sequence numbers, and its
    // callbacks came in that order.
    for t in 0..4 {
        let mine: Vec<_> = results.iter().filter(|(th, _, _)| *th == t).collect();
        assert!(mine
            .windows(2)
            .all(|w| w[0].1 < w[1].1 && w[0].2.seq < w[1].2.seq));
    }
    ledger.close().expect("closes");
    let v = verify(dir.path(), &[signer(1).verifier()]).expect("verifies");
    assert_eq!(v.records, 8000);
    // The ledger holds each request exactly once.
    let ids: HashSet<String> = LedgerReader::open(dir.path(), 0)
        .expect("reader")
        .map(|r| match r.expect("record").record.body {
            RecordBody::Usage(u) => u.request_id.0,
            RecordBody::Capacity(_) => unreachable!("only usage written"),
        })
        .collect();
    assert_eq!(ids.len(), 8000);
}

#[test]
fn checkpoints_by_count_and_by_time() {
    let keys = [signer(1).verifier()];
    let sizes = |dir: &std::path::Path| -> Vec<u64> {
        verified_checkpoints(dir, &keys)
            .expect("checkpoints")
            .iter()
            .map(|(_, c)| c.checkpoint.size)
            .collect()
    };

    // By count: after the batches that bring the unsigned records to 10.
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, _) = Ledger::open(config(dir.path(), 1 << 20, 10), signer(1)).expect("opens");
    append_chunks(&ledger, 0, 25, 5);
    assert_eq!(sizes(dir.path()), vec![10, 20]);
    ledger.close().expect("closes");
    assert_eq!(sizes(dir.path()), vec![10, 20, 25]);

    // By time: records that waited 30 ms are signed without more appends.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LedgerConfig {
        checkpoint_interval: std::time::Duration::from_millis(30),
        ..config(dir.path(), 1 << 20, 0)
    };
    let (ledger, _) = Ledger::open(cfg, signer(1)).expect("opens");
    append_range(&ledger, 0, 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sizes(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(sizes(dir.path()), vec![3]);
    ledger.close().expect("closes");
    // No new records since: close adds no duplicate checkpoint.
    assert_eq!(sizes(dir.path()), vec![3]);
}

#[test]
fn key_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, _) = Ledger::open(config(dir.path(), 1 << 20, 0), signer(1)).expect("opens");
    append_range(&ledger, 0, 10);
    ledger.close().expect("closes");
    let (ledger, _) = Ledger::open(config(dir.path(), 1 << 20, 0), signer(2)).expect("opens");
    append_range(&ledger, 10, 20);
    ledger.close().expect("closes");

    let both = [signer(1).verifier(), signer(2).verifier()];
    let v = verify(dir.path(), &both).expect("verifies with both keys");
    assert_eq!(v.records, 20);
    assert_eq!(
        v.last_checkpoint.map(|c| c.signed_by),
        Some(vec!["test-key-2".to_owned()])
    );
    // With the new key alone, the old key's checkpoint is unverifiable.
    let err = verify(dir.path(), &[signer(2).verifier()]).expect_err("old key missing");
    assert!(matches!(err.kind, ProblemKind::BadSignature(_)), "{err}");
    // A wrong origin is refused at open.
    let other = LedgerConfig {
        origin: "another/ledger".into(),
        ..config(dir.path(), 1 << 20, 0)
    };
    assert!(matches!(
        Ledger::open(other, signer(2)),
        Err(LedgerError::Config(_))
    ));
}

#[test]
fn export_jsonl_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 10, 1 << 20, 0);
    let mut out = Vec::new();
    let report = export_jsonl(dir.path(), &mut out).expect("exports");
    assert_eq!(report.records, 10);
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 10);
    let first = &lines[0];
    assert_eq!(first["seq"], 0);
    assert_eq!(first["type"], "usage");
    assert_eq!(first["prev"], "0".repeat(64));
    assert_eq!(first["request_id"], "chatcmpl-00000000");
    assert_eq!(first["finish_reason"], "length");
    assert_eq!(first["arrived_at"], "2023-11-14T22:13:20.000000000Z");
    assert_eq!(lines[1]["prev"], lines[0]["hash"]);
    let cap = &lines[4];
    assert_eq!(cap["type"], "capacity");
    assert_eq!(cap["tenants"][1]["tokens"], 304);
    assert_eq!(cap["busy_seconds"], 7.5);
}

/// The encoded records and checkpoint notes of a ledger directory.
fn contents(dir: &std::path::Path) -> (Vec<Vec<u8>>, Vec<String>) {
    let records = LedgerReader::open(dir, 0)
        .expect("reader")
        .map(|r| r.expect("record").bytes)
        .collect();
    let notes = verified_checkpoints(dir, &[signer(1).verifier()])
        .expect("checkpoints")
        .into_iter()
        .map(|(_, c)| c.note)
        .collect();
    (records, notes)
}

#[test]
fn import_rebuilds_a_ledger_that_verifies() {
    let src = tempfile::tempdir().expect("tempdir");
    write_ledger(src.path(), 300, 8192, 64);
    let original = verify(src.path(), &[signer(1).verifier()]).expect("verifies");
    let (records, notes) = contents(src.path());

    // Copying the original's checkpoints: verifies with the original key.
    let copy = tempfile::tempdir().expect("tempdir");
    let mut importer = Importer::create(config(copy.path(), 4096, 0), None).expect("creates");
    for r in &records {
        importer.push_record(r).expect("imports");
    }
    for n in notes.iter().rev() {
        importer.push_checkpoint(n).expect("note");
    }
    let report = importer.finish(&[signer(1).verifier()]).expect("verifies");
    assert_eq!(report.records, 300);
    assert_eq!(report.root, original.root);
    assert_eq!(report.checkpoints, original.checkpoints);
    verify(copy.path(), &[signer(1).verifier()]).expect("verifies with the original key");

    // Re-signing with the importer's key: same root, importer's checkpoints.
    let resigned = tempfile::tempdir().expect("tempdir");
    let mut importer =
        Importer::create(config(resigned.path(), 1 << 20, 100), Some(signer(9))).expect("creates");
    for r in &records {
        importer.push_record(r).expect("imports");
    }
    let report = importer.finish(&[]).expect("verifies");
    assert_eq!(report.root, original.root);
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.unsigned_records, 0);

    // Out of order, a gap, a broken link, a non-empty target: refused.
    let bad = tempfile::tempdir().expect("tempdir");
    let mut importer = Importer::create(config(bad.path(), 1 << 20, 0), None).expect("creates");
    assert!(importer.push_record(&records[1]).is_err());
    importer.push_record(&records[0]).expect("first");
    assert!(importer.push_record(&records[0]).is_err());
    assert!(importer.push_record(&records[2]).is_err());
    let mut relinked = Record::decode(&records[1]).expect("decodes");
    relinked.prev_hash.0[0] ^= 1;
    assert!(importer
        .push_record(&relinked.encode().expect("encodes"))
        .is_err());
    assert!(Importer::create(config(src.path(), 1 << 20, 0), None).is_err());
}

#[test]
fn proofs_from_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 200, 1 << 20, 50);
    let keys = [signer(1).verifier()];
    let cps = verified_checkpoints(dir.path(), &keys).expect("checkpoints");
    let sizes: Vec<u64> = cps.iter().map(|(_, c)| c.checkpoint.size).collect();
    assert_eq!(sizes, vec![50, 100, 150, 200]);
    let note = |size: u64| {
        cps.iter()
            .find(|(_, c)| c.checkpoint.size == size)
            .map(|(_, c)| c.note.clone())
            .expect("checkpoint of that size")
    };

    for seq in [0, 1, 49, 99, 123, 199] {
        let p = proof::prove_inclusion(dir.path(), seq, 200).expect("proves");
        let parsed = InclusionProof::parse(&p.to_text()).expect("parses");
        assert_eq!(parsed, p);
        let (record, cp) = parsed.check(&note(200), &keys).expect("checks");
        assert_eq!(record.seq, seq);
        assert_eq!(record.body, body(seq));
        assert_eq!(cp.size, 200);
        // The wrong checkpoint, a changed record, another key: refused.
        assert!(parsed.check(&note(150), &keys).is_err());
        let mut forged = parsed.clone();
        let last = forged.record.len() - 1;
        forged.record[last] ^= 1;
        assert!(forged.check(&note(200), &keys).is_err());
        assert!(parsed.check(&note(200), &[signer(2).verifier()]).is_err());
    }
    assert!(proof::prove_inclusion(dir.path(), 200, 200).is_err());

    for (old, new) in [(50, 200), (100, 150), (150, 200), (200, 200)] {
        let p = proof::prove_consistency(dir.path(), old, new).expect("proves");
        let parsed = ConsistencyProof::parse(&p.to_text()).expect("parses");
        assert_eq!(parsed, p);
        parsed
            .check(&note(old), &note(new), &keys)
            .expect("consistent");
        if old != new {
            assert!(parsed.check(&note(new), &note(old), &keys).is_err());
        }
    }
}
