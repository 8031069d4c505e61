//! The witness against a log that behaves, and against one that rewrote its
//! history: real signed checkpoints, real Merkle proofs, state on disk.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::cosignature::{self, Cosigner, CosignerKey};
use tokenmill_metering::hash::Hash;
use tokenmill_metering::keys::Signer;
use tokenmill_metering::merkle;
use tokenmill_metering::note;
use tokenmill_witness::request::AddCheckpoint;
use tokenmill_witness::store::Store;
use tokenmill_witness::{AddError, Witness};

const ORIGIN: &str = "cloud.example/ledger";

fn log_key() -> Signer {
    Signer::from_seed(ORIGIN, [1; 32]).unwrap()
}

fn cosigner() -> Cosigner {
    Cosigner::from_signer(&Signer::from_seed("backer.example/witness", [2; 32]).unwrap())
}

fn witness(dir: &std::path::Path) -> Witness {
    let logs = HashMap::from([(ORIGIN.to_owned(), vec![log_key().verifier()])]);
    Witness::new(cosigner(), logs, Store::open(dir).unwrap())
}

/// A ledger's leaves: records `0..n`, with `edit` rewriting one of them.
fn leaves(n: usize, edit: Option<usize>) -> Vec<Hash> {
    (0..n)
        .map(|i| {
            let record = if edit == Some(i) {
                format!("record {i}, rewritten")
            } else {
                format!("record {i}")
            };
            merkle::leaf_hash(record.as_bytes())
        })
        .collect()
}

fn signed_checkpoint(leaves: &[Hash], size: usize, key: &Signer) -> String {
    Checkpoint::new(ORIGIN, size as u64, merkle::root_of(&leaves[..size]))
        .sign(key)
        .unwrap()
}

/// The request a log holding `leaves` sends to go from `old` to `new`.
fn request(leaves: &[Hash], old: usize, new: usize) -> String {
    AddCheckpoint {
        old_size: old as u64,
        proof: merkle::consistency_proof(leaves, old as u64, new as u64).unwrap(),
        note: signed_checkpoint(leaves, new, &log_key()),
    }
    .to_body()
}

/// Checks `line` is the witness's valid cosignature of the checkpoint in
/// `body`.
fn assert_cosigned(body: &str, line: &str) {
    let request = AddCheckpoint::parse(body).unwrap();
    let with_cosignature = format!("{}{line}", request.note);
    let parsed = note::parse(&with_cosignature).unwrap();
    let key = CosignerKey::parse(&cosigner().public().to_text()).unwrap();
    let found = cosignature::cosignatures(&parsed.text, &parsed.signatures, &[key]).unwrap();
    assert_eq!(found.len(), 1, "{line}");
    assert_eq!(found[0].witness, "backer.example/witness");
}

#[test]
fn an_honest_log_is_cosigned_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let w = witness(dir.path());
    let ledger = leaves(13, None);
    for (old, new) in [(0, 3), (3, 8), (8, 8), (8, 13)] {
        let body = request(&ledger, old, new);
        let line = w.add_checkpoint(&body).unwrap();
        assert_cosigned(&body, &line);
    }
    assert_eq!(w.latest_size(ORIGIN), 13);
}

#[test]
fn a_rewritten_history_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = witness(dir.path());
    let honest = leaves(13, None);
    w.add_checkpoint(&request(&honest, 0, 8)).unwrap();
    // The cloud rewrites record 5 and signs the result with the same key.
    let forged = leaves(13, Some(5));
    // Same size, another root.
    let err = w.add_checkpoint(&request(&forged, 8, 8)).unwrap_err();
    assert!(matches!(err, AddError::Fork { size: 8 }), "{err}");
    assert_eq!(err.status(), 409);
    // A longer rewritten history: its own proof does not lead from the
    // root the witness holds.
    let err = w.add_checkpoint(&request(&forged, 8, 13)).unwrap_err();
    assert!(matches!(err, AddError::Inconsistent { .. }), "{err}");
    assert_eq!(err.status(), 422);
    // The honest log goes on.
    w.add_checkpoint(&request(&honest, 8, 13)).unwrap();
}

#[test]
fn refusals_carry_the_protocol_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let w = witness(dir.path());
    let ledger = leaves(8, None);
    w.add_checkpoint(&request(&ledger, 0, 3)).unwrap();
    // A stale old size: 409, and the size the witness holds.
    let err = w.add_checkpoint(&request(&ledger, 0, 8)).unwrap_err();
    assert!(
        matches!(err, AddError::SizeConflict { latest: 3, old: 0 }),
        "{err}"
    );
    assert_eq!(err.status(), 409);
    // Old size past the checkpoint: 400.
    let mut body = AddCheckpoint::parse(&request(&ledger, 3, 3)).unwrap();
    body.old_size = 5;
    let err = w.add_checkpoint(&body.to_body()).unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    // Signed by a key the witness does not trust for this log: 403.
    let stranger = Signer::from_seed(ORIGIN, [9; 32]).unwrap();
    let forged = AddCheckpoint {
        old_size: 3,
        proof: merkle::consistency_proof(&ledger, 3, 8).unwrap(),
        note: signed_checkpoint(&ledger, 8, &stranger),
    };
    let err = w.add_checkpoint(&forged.to_body()).unwrap_err();
    assert_eq!(err.status(), 403, "{err}");
    // A log the witness does not follow: 404.
    let other = Signer::from_seed("other.example/ledger", [3; 32]).unwrap();
    let unknown = AddCheckpoint {
        old_size: 0,
        proof: vec![],
        note: Checkpoint::new("other.example/ledger", 1, ledger[0])
            .sign(&other)
            .unwrap(),
    };
    let err = w.add_checkpoint(&unknown.to_body()).unwrap_err();
    assert_eq!(err.status(), 404, "{err}");
    // Garbage: 400.
    assert_eq!(w.add_checkpoint("hello").unwrap_err().status(), 400);
    // None of it moved the state.
    assert_eq!(w.latest_size(ORIGIN), 3);
}

#[test]
fn the_state_outlives_the_witness() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = leaves(13, None);
    witness(dir.path())
        .add_checkpoint(&request(&ledger, 0, 8))
        .unwrap();
    let restarted = witness(dir.path());
    assert_eq!(restarted.latest_size(ORIGIN), 8);
    let err = restarted
        .add_checkpoint(&request(&leaves(8, Some(2)), 8, 8))
        .unwrap_err();
    assert!(matches!(err, AddError::Fork { .. }), "{err}");
    restarted.add_checkpoint(&request(&ledger, 8, 13)).unwrap();
}

/// One HTTP/1.1 request on a fresh connection; returns status, content
/// type and body.
fn post(address: std::net::SocketAddr, body: &str) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /add-checkpoint HTTP/1.1\r\nHost: witness\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

#[test]
fn over_http_a_conflict_says_the_size_the_witness_holds() {
    let dir = tempfile::tempdir().unwrap();
    let w = Arc::new(witness(dir.path()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    runtime.spawn(async move {
        axum::serve(listener, tokenmill_witness::http::router(w))
            .await
            .unwrap();
    });
    let ledger = leaves(8, None);
    let first = request(&ledger, 0, 3);
    let (status, _, line) = post(address, &first);
    assert_eq!(status, 200, "{line}");
    assert!(
        line.starts_with("\u{2014} backer.example/witness "),
        "{line}"
    );
    assert_cosigned(&first, &line);
    let (status, content_type, body) = post(address, &request(&ledger, 0, 8));
    assert_eq!(
        (status, content_type.as_str(), body.as_str()),
        (409, "text/x.tlog.size", "3\n")
    );
    let (status, _, body) = post(address, &request(&leaves(8, Some(1)), 3, 8));
    assert_eq!(status, 422, "{body}");
}
