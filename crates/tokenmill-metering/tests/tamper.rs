//! Verification catches every kind of damage and tampering, and names the
//! first bad record: flipped bytes, truncation, deleted segments, reordered
//! records, records swapped between segments, rewritten history, forged
//! checkpoints.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::fs;
use std::path::{Path, PathBuf};
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::merkle::{leaf_hash, CompactTree};
use tokenmill_metering::record::{encode_record, record_hash};
use tokenmill_metering::{
    verify, LedgerReader, ProblemKind, Record, VerifyError, CHECKPOINTS_FILE,
};

fn keys() -> Vec<tokenmill_metering::VerifierKey> {
    vec![signer(1).verifier()]
}

/// A closed ledger of 300 records in segments of about 4 KiB, with a
/// checkpoint every 40 records.
fn ledger() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ledger(dir.path(), 300, 4096, 40);
    verify(dir.path(), &keys()).expect("pristine ledger verifies");
    dir
}

/// A frame's offset, length (with overhead) and record sequence number.
type FrameAt = (usize, usize, u64);

/// For each segment file: its frames.
fn layout(dir: &Path) -> Vec<(PathBuf, Vec<FrameAt>)> {
    let files = segment_files(dir);
    let mut by_file: Vec<(PathBuf, Vec<FrameAt>)> =
        files.iter().map(|f| (f.clone(), Vec::new())).collect();
    for r in LedgerReader::open(dir, 0).expect("reader") {
        let r = r.expect("record");
        let entry = by_file
            .iter_mut()
            .find(|(f, _)| f.as_path() == &*r.file)
            .expect("file listed");
        entry.1.push((r.offset as usize, r.bytes.len() + 8, r.seq));
    }
    by_file
}

fn expect_err(dir: &Path) -> VerifyError {
    match verify(dir, &keys()) {
        Ok(report) => panic!("tampered ledger verified: {report:?}"),
        Err(e) => e,
    }
}

#[test]
fn flipped_bytes_are_caught_at_the_record_that_holds_them() {
    let dir = ledger();
    let layout = layout(dir.path());
    let notes = dir.path().join(CHECKPOINTS_FILE);
    let note_frames = frames(&fs::read(&notes).expect("read"));
    let mut files: Vec<PathBuf> = layout.iter().map(|(f, _)| f.clone()).collect();
    files.push(notes.clone());

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for case in 0..400 {
        let file = &files[rng.random_range(0..files.len())];
        let original = fs::read(file).expect("read");
        let offset = rng.random_range(0..original.len());
        let mut damaged = original.clone();
        damaged[offset] ^= rng.random_range(1..=255u8);
        fs::write(file, &damaged).expect("write");
        let err = expect_err(dir.path());
        fs::write(file, &original).expect("restore");

        assert_eq!(&err.file, file, "case {case}: {err}");
        if offset < 22 {
            assert_eq!(err.offset, 0, "case {case}: header flip: {err}");
            continue;
        }
        if *file == notes {
            let (start, _) = note_frames
                .iter()
                .copied()
                .find(|&(s, l)| s <= offset && offset < s + l)
                .expect("offset inside a note frame");
            assert_eq!(err.offset, start as u64, "case {case}: {err}");
            assert_eq!(err.seq, None);
            continue;
        }
        let frames = &layout.iter().find(|(f, _)| f == file).expect("segment").1;
        let &(start, _, seq) = frames
            .iter()
            .find(|&&(s, l, _)| s <= offset && offset < s + l)
            .expect("offset inside a frame");
        assert_eq!(
            err.offset, start as u64,
            "case {case}, offset {offset}: {err}"
        );
        assert_eq!(err.seq, Some(seq), "case {case}: {err}");
    }
    verify(dir.path(), &keys()).expect("restored ledger verifies");
}

#[test]
fn truncation_anywhere_is_caught() {
    let dir = ledger();
    let layout = layout(dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a11);
    let (last_file, last_frames) = layout.last().expect("segments");
    let middle = &layout[layout.len() / 2];
    for (file, frames) in [(last_file, last_frames), (&middle.0, &middle.1)] {
        let original = fs::read(file).expect("read");
        let mut cuts: Vec<usize> = (0..60)
            .map(|_| rng.random_range(0..original.len()))
            .collect();
        cuts.extend(frames.iter().map(|&(s, _, _)| s)); // every frame boundary
        cuts.extend([0, 1, 21, 22]);
        for cut in cuts {
            fs::write(file, &original[..cut]).expect("truncate");
            let err = expect_err(dir.path());
            fs::write(file, &original).expect("restore");
            let inside = frames.iter().find(|&&(s, l, _)| s < cut && cut < s + l);
            match (inside, file == last_file) {
                (Some(&(start, _, seq)), _) => {
                    assert_eq!(&err.file, file, "cut {cut}: {err}");
                    assert_eq!(err.offset, start as u64, "cut {cut}: {err}");
                    assert_eq!(err.seq, Some(seq));
                    assert!(
                        matches!(err.kind, ProblemKind::TornFrame(_)),
                        "cut {cut}: {err}"
                    );
                }
                (None, true) if cut >= 22 => {
                    assert!(
                        matches!(err.kind, ProblemKind::Truncation { .. }),
                        "cut {cut}: {err}"
                    )
                }
                (None, false) if cut >= 22 => {
                    assert!(
                        matches!(err.kind, ProblemKind::Gap { .. }),
                        "cut {cut}: {err}"
                    )
                }
                (None, _) => {} // inside the header: caught, any kind
            }
        }
    }
    verify(dir.path(), &keys()).expect("restored ledger verifies");
}

#[test]
fn deleted_segments_are_caught() {
    for which in ["first", "middle", "last"] {
        let dir = ledger();
        let files = segment_files(dir.path());
        let (victim, idx) = match which {
            "first" => (&files[0], 0),
            "middle" => (&files[files.len() / 2], files.len() / 2),
            _ => (&files[files.len() - 1], files.len() - 1),
        };
        let first_missing = layout(dir.path())[idx].1[0].2;
        fs::remove_file(victim).expect("delete");
        let err = expect_err(dir.path());
        match which {
            "last" => {
                assert!(matches!(err.kind, ProblemKind::Truncation { .. }), "{err}");
                assert_eq!(err.seq, Some(first_missing));
            }
            _ => {
                assert_eq!(err.file, files[idx + 1], "{which}: {err}");
                assert_eq!(err.offset, 0);
                assert_eq!(err.seq, Some(first_missing));
                assert!(
                    matches!(err.kind, ProblemKind::Gap { .. }),
                    "{which}: {err}"
                );
            }
        }
    }
}

#[test]
fn reordered_records_are_caught() {
    let dir = ledger();
    let layout = layout(dir.path());
    let (file, frames) = &layout[1];
    let data = fs::read(file).expect("read");
    let (a, b) = (frames[2], frames[3]);
    let mut swapped = data[..a.0].to_vec();
    swapped.extend_from_slice(&data[b.0..b.0 + b.1]);
    swapped.extend_from_slice(&data[a.0..a.0 + a.1]);
    swapped.extend_from_slice(&data[b.0 + b.1..]);
    fs::write(file, &swapped).expect("write");
    let err = expect_err(dir.path());
    assert_eq!(&err.file, file);
    assert_eq!(err.offset, a.0 as u64);
    assert_eq!(err.seq, Some(a.2));
    assert_eq!(
        err.kind,
        ProblemKind::Reorder {
            expected: a.2,
            found: b.2
        }
    );
}

#[test]
fn records_swapped_between_segments_are_caught() {
    let dir = ledger();
    let layout = layout(dir.path());
    let (f1, fr1) = &layout[2];
    let (f2, fr2) = &layout[3];
    let d1 = fs::read(f1).expect("read");
    let d2 = fs::read(f2).expect("read");
    let last = *fr1.last().expect("frames");
    let first = fr2[0];
    let mut n1 = d1[..last.0].to_vec();
    n1.extend_from_slice(&d2[first.0..first.0 + first.1]);
    let mut n2 = d2[..first.0].to_vec();
    n2.extend_from_slice(&d1[last.0..last.0 + last.1]);
    n2.extend_from_slice(&d2[first.0 + first.1..]);
    fs::write(f1, n1).expect("write");
    fs::write(f2, n2).expect("write");
    let err = expect_err(dir.path());
    assert_eq!(&err.file, f1);
    assert_eq!(err.offset, last.0 as u64);
    assert_eq!(err.seq, Some(last.2));
    assert_eq!(
        err.kind,
        ProblemKind::Reorder {
            expected: last.2,
            found: first.2
        }
    );
}

/// Changes record `seq` (one token less) and re-chains every record after
/// it, fixing every hash and checksum: only the signed roots can tell.
fn rewrite_history(dir: &Path, seq: u64) {
    let layout = layout(dir);
    let mut prev = None;
    for (file, frames) in &layout {
        let data = fs::read(file).expect("read");
        let mut out = data[..22].to_vec();
        for &(start, len, s) in frames {
            let payload = &data[start + 4..start + len - 4];
            let mut record = Record::decode(payload).expect("decodes");
            if s == seq {
                if let tokenmill_metering::RecordBody::Usage(u) = &mut record.body {
                    u.tokens.completion_tokens -= 1;
                }
            }
            if let Some(p) = prev {
                record.prev_hash = p;
            }
            let mut bytes = Vec::new();
            encode_record(
                record.seq,
                &record.prev_hash,
                &record.body.encode().expect("encodes"),
                &mut bytes,
            );
            prev = Some(record_hash(&bytes));
            out.extend_from_slice(&frame(&bytes));
        }
        fs::write(file, out).expect("write");
    }
}

#[test]
fn rewritten_history_is_caught_by_the_signed_root() {
    let dir = ledger();
    rewrite_history(dir.path(), 101);
    let err = expect_err(dir.path());
    assert_eq!(err.file, dir.path().join(CHECKPOINTS_FILE));
    // The first checkpoint that covers record 101 is the one at 120.
    assert_eq!(err.kind, ProblemKind::BadRoot { size: 120 });
}

#[test]
fn a_changed_link_alone_is_a_bad_chain_link() {
    let dir = ledger();
    let layout = layout(dir.path());
    let (file, frames) = &layout[1];
    let data = fs::read(file).expect("read");
    let (start, len, seq) = frames[1];
    let mut record = Record::decode(&data[start + 4..start + len - 4]).expect("decodes");
    record.prev_hash.0[5] ^= 0x10;
    let mut out = data[..start].to_vec();
    out.extend_from_slice(&frame(&record.encode().expect("encodes")));
    out.extend_from_slice(&data[start + len..]);
    fs::write(file, out).expect("write");
    let err = expect_err(dir.path());
    assert_eq!(
        (&err.file, err.offset, err.seq),
        (file, start as u64, Some(seq))
    );
    assert_eq!(err.kind, ProblemKind::BadChainLink);
}

/// Appends a note frame to the checkpoints file.
fn add_note(dir: &Path, note: &str) {
    let path = dir.join(CHECKPOINTS_FILE);
    let mut data = fs::read(&path).expect("read");
    data.extend_from_slice(&frame(note.as_bytes()));
    fs::write(&path, data).expect("write");
}

fn root_of_first(dir: &Path, n: u64) -> tokenmill_metering::Hash {
    let mut tree = CompactTree::new();
    for r in LedgerReader::open(dir, 0).expect("reader").take(n as usize) {
        tree.push(leaf_hash(&r.expect("record").bytes));
    }
    tree.root()
}

#[test]
fn forged_checkpoints_are_caught() {
    // Signed by a key nobody listed.
    let dir = ledger();
    let cp = Checkpoint::new(ORIGIN, 300, root_of_first(dir.path(), 300));
    add_note(dir.path(), &cp.sign(&signer(7)).expect("signs"));
    let err = expect_err(dir.path());
    assert!(matches!(err.kind, ProblemKind::BadSignature(_)), "{err}");
    assert_eq!(err.file, dir.path().join(CHECKPOINTS_FILE));

    // The real key's signature over other text (a bigger size).
    let dir = ledger();
    let honest = Checkpoint::new(ORIGIN, 300, root_of_first(dir.path(), 300))
        .sign(&signer(1))
        .expect("signs");
    add_note(dir.path(), &honest.replacen("\n300\n", "\n301\n", 1));
    let err = expect_err(dir.path());
    assert!(matches!(err.kind, ProblemKind::BadSignature(_)), "{err}");

    // The real key signing a wrong root (a leaked key, or a bug).
    let dir = ledger();
    let wrong = Checkpoint::new(ORIGIN, 300, root_of_first(dir.path(), 299));
    add_note(dir.path(), &wrong.sign(&signer(1)).expect("signs"));
    let err = expect_err(dir.path());
    assert_eq!(err.kind, ProblemKind::BadRoot { size: 300 });

    // A checkpoint beyond the records: they were cut off.
    let dir = ledger();
    let beyond = Checkpoint::new(ORIGIN, 301, root_of_first(dir.path(), 300));
    add_note(dir.path(), &beyond.sign(&signer(1)).expect("signs"));
    let err = expect_err(dir.path());
    assert!(matches!(err.kind, ProblemKind::Truncation { .. }), "{err}");

    // Another origin.
    let dir = ledger();
    let other = Checkpoint::new("other/ledger", 300, root_of_first(dir.path(), 300));
    add_note(dir.path(), &other.sign(&signer(1)).expect("signs"));
    let err = expect_err(dir.path());
    assert!(matches!(err.kind, ProblemKind::BadCheckpoint(_)), "{err}");

    // The checkpoints file deleted: nothing is signed.
    let dir = ledger();
    fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).expect("delete");
    assert_eq!(expect_err(dir.path()).kind, ProblemKind::NoCheckpoint);
}
