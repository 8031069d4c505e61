//! Crash recovery: a torn tail is detected, reported and set aside, records
//! that were whole are never changed, appending continues after the last
//! whole record, and a process killed while writing loses no acknowledged
//! record.

mod common;

use common::*;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenmill_metering::{
    segment_name, verify, Ledger, LedgerConfig, LedgerError, LedgerReader, ProblemKind,
    CHECKPOINTS_FILE,
};

fn keys() -> Vec<tokenmill_metering::VerifierKey> {
    vec![signer(1).verifier()]
}

fn record_bytes(dir: &Path) -> Vec<Vec<u8>> {
    LedgerReader::open(dir, 0)
        .expect("reader")
        .map(|r| r.expect("record").bytes)
        .collect()
}

/// Removes the last checkpoint note, as if the process died after its
/// last records were durable but before it signed them.
fn drop_last_checkpoint(dir: &Path) {
    let path = dir.join(CHECKPOINTS_FILE);
    let data = fs::read(&path).expect("read");
    let (start, _) = *frames(&data).last().expect("a note");
    fs::write(&path, &data[..start]).expect("write");
}

#[test]
fn torn_tail_is_reported_set_aside_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 120, 4096, 50);
    let before = record_bytes(dir.path());
    drop_last_checkpoint(dir.path());
    // Half of the last frame reached the disk.
    let last = segment_files(dir.path()).pop().expect("segment");
    let data = fs::read(&last).expect("read");
    let (start, len) = *frames(&data).last().expect("frames");
    let cut = start + len / 2;
    fs::write(&last, &data[..cut]).expect("tear");
    let err = verify(dir.path(), &keys()).expect_err("a torn tail fails verification");
    assert!(matches!(err.kind, ProblemKind::TornFrame(_)), "{err}");
    assert_eq!((err.offset, err.seq), (start as u64, Some(119)));

    let (ledger, report) = Ledger::open(config(dir.path(), 4096, 50), signer(1)).expect("opens");
    assert_eq!(report.records, 119);
    assert_eq!(report.set_aside.len(), 1);
    let aside = &report.set_aside[0];
    assert_eq!(aside.file, last);
    assert_eq!(aside.offset, start as u64);
    assert_eq!(aside.bytes, (cut - start) as u64);
    assert_eq!(
        fs::read(&aside.moved_to).expect("torn file"),
        &data[start..cut]
    );
    assert_eq!(fs::metadata(&last).expect("meta").len(), start as u64);

    let receipts = append_range(&ledger, 119, 130);
    assert_eq!(receipts.first().map(|r| r.seq), Some(119));
    ledger.close().expect("closes");

    let v = verify(dir.path(), &keys()).expect("verifies after recovery");
    assert_eq!(v.records, 130);
    assert_eq!(v.set_aside_files, vec![aside.moved_to.clone()]);
    let after = record_bytes(dir.path());
    assert_eq!(
        &after[..119],
        &before[..119],
        "whole records are never changed"
    );
}

#[test]
fn a_new_segment_with_a_torn_header_is_set_aside_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 30, 1 << 20, 0);
    let torn = dir.path().join(segment_name(30));
    fs::write(&torn, b"TMLEDG").expect("write");
    let (ledger, report) = Ledger::open(config(dir.path(), 1 << 20, 0), signer(1)).expect("opens");
    assert_eq!(report.records, 30);
    assert_eq!(report.set_aside.len(), 1);
    assert_eq!(
        fs::read(&report.set_aside[0].moved_to).expect("read"),
        b"TMLEDG"
    );
    append_range(&ledger, 30, 40);
    ledger.close().expect("closes");
    assert_eq!(verify(dir.path(), &keys()).expect("verifies").records, 40);
}

#[test]
fn a_torn_checkpoint_note_is_set_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 30, 1 << 20, 0);
    let path = dir.path().join(CHECKPOINTS_FILE);
    let mut data = fs::read(&path).expect("read");
    let whole = data.len();
    let note = frame(b"half a note that never finished");
    data.extend_from_slice(&note[..note.len() / 2]);
    fs::write(&path, &data).expect("write");
    let (ledger, report) = Ledger::open(config(dir.path(), 1 << 20, 0), signer(1)).expect("opens");
    assert_eq!(report.set_aside.len(), 1);
    assert_eq!(report.set_aside[0].offset, whole as u64);
    append_range(&ledger, 30, 31);
    ledger.close().expect("closes");
    assert_eq!(verify(dir.path(), &keys()).expect("verifies").records, 31);
}

#[test]
fn damage_that_is_not_a_torn_tail_refuses_to_open() {
    // A flipped byte in a complete, earlier segment.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 200, 4096, 0);
    let first = &segment_files(dir.path())[0];
    let mut data = fs::read(first).expect("read");
    data[100] ^= 1;
    fs::write(first, data).expect("write");
    match Ledger::open(config(dir.path(), 4096, 0), signer(1)) {
        Err(LedgerError::Corrupt(e)) => assert_eq!(e.kind, ProblemKind::BadChecksum),
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }

    // Acknowledged (checkpointed) records missing at the end.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 50, 1 << 20, 0);
    let last = segment_files(dir.path()).pop().expect("segment");
    let data = fs::read(&last).expect("read");
    let (start, _) = *frames(&data).last().expect("frames");
    fs::write(&last, &data[..start]).expect("cut at a frame boundary");
    match Ledger::open(config(dir.path(), 1 << 20, 0), signer(1)) {
        Err(LedgerError::Corrupt(e)) => {
            assert!(matches!(e.kind, ProblemKind::Truncation { .. }), "{e}")
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
}

const CHILD_DIR: &str = "TOKENMILL_METERING_CRASH_CHILD_DIR";

/// Not a test on its own: the writer process that
/// `sigkill_while_writing_loses_no_acknowledged_record` kills. It appends
/// until killed (at most 60 s) and prints "ack <seq>" once a record is
/// durable.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let cfg = LedgerConfig {
        checkpoint_interval: Duration::from_millis(20),
        ..config(Path::new(&dir), 16 << 10, 500)
    };
    let (ledger, _) = Ledger::open(cfg, signer(1)).expect("opens");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while Instant::now() < deadline {
        for _ in 0..50 {
            ledger.append(
                &body(i),
                Box::new(|r| {
                    if let Ok(r) = r {
                        println!("ack {}", r.seq);
                    }
                }),
            );
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigkill_while_writing_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let stdout = child.stdout.take().expect("stdout");
    let mut max_acked = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(seq) = line
            .strip_prefix("ack ")
            .and_then(|s| s.parse::<u64>().ok())
        {
            max_acked = Some(seq);
            if seq >= 5000 {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let max_acked = max_acked.expect("the child acknowledged records");
    assert!(max_acked >= 5000);

    let (ledger, report) =
        Ledger::open(config(dir.path(), 16 << 10, 500), signer(1)).expect("opens");
    assert!(
        report.records > max_acked,
        "acknowledged record {max_acked} lost: {report:?}"
    );
    ledger.close().expect("closes");
    let v = verify(dir.path(), &keys()).expect("verifies after the crash");
    assert_eq!(v.records, report.records);
    for (i, r) in LedgerReader::open(dir.path(), 0)
        .expect("reader")
        .enumerate()
    {
        assert_eq!(
            r.expect("record").record.body,
            body(i as u64),
            "record {i} appears once, in place"
        );
    }
}
