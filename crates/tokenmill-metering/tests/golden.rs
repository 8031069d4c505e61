//! The golden test vectors of docs/ledger-format.md: fixed key, fixed
//! records, their exact bytes, hashes, tree root, checkpoint and signature.
//! The test asserts the values and that the document quotes each of them,
//! so the document cannot drift from the code.
//!
//! `GOLDEN_PRINT=1 cargo test -p tokenmill-metering --test golden -- --nocapture`
//! prints the values (to regenerate the document after a deliberate format
//! change, which also needs a new format version).

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::hash::{from_hex, to_hex};
use tokenmill_metering::keys::Signer;
use tokenmill_metering::merkle::{self, leaf_hash, CompactTree};
use tokenmill_metering::record::{encode_record, record_hash};
use tokenmill_metering::{Hash, Record, RecordBody, VerifierKey};
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantCapacity, TenantId, TokenCounts,
    UsageEvent,
};

const SEED_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_NAME: &str = "tokenmill-golden";
const ORIGIN: &str = "tokenmill.example/golden";
const CHECKPOINT_TIME_MS: u64 = 1_700_000_100_000;

const PUBLIC_KEY_HEX: &str = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8";
const KEY_HASH_HEX: &str = "fdd2db77";
const VERIFIER_KEY: &str = "tokenmill-golden+fdd2db77+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4";
const PRIVATE_KEY: &str =
    "PRIVATE+KEY+tokenmill-golden+fdd2db77+AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f";
const RECORD_HEX: [&str; 3] = [
    "0100000000000000000000000000000000000000000000000000000000000000000000000000000000010000000d63686174636d706c2d303030310000000461636d65000000056b65792d3700000015536d6f6c4c4d322d3133354d2d496e737472756374000000000000000c0000000000000004000000000000001e013fd0000000000000000000006553f1001dcd6500000000006553f1010ee6b280",
    "01000000000000000117e9c3a5ec370d6e3d44dd73b371f09d9c1f304c839d2c6d67032078f72e84bc0200000006637564613a30000000006553f10000000000000000006553f10a000000004024000000000000401e0000000000000000000000001000000000020000000461636d6540140000000000000000000000000bb8000000046265746140040000000000000000000000000448",
    "010000000000000002912fab33d4631c220e6ecae963b5b0d8e6b7ab4a39653673bde26c79c5df799d010000000d63686174636d706c2d303030320000000462657461000000056b65792d3900000015536d6f6c4c4d322d3133354d2d496e737472756374000000000000006400000000000000000000000000000007033fc0000000000000000000006553f10500000000000000006553f10600000001",
];
const RECORD_HASH_HEX: [&str; 3] = [
    "17e9c3a5ec370d6e3d44dd73b371f09d9c1f304c839d2c6d67032078f72e84bc",
    "912fab33d4631c220e6ecae963b5b0d8e6b7ab4a39653673bde26c79c5df799d",
    "ebfd65ee99a2aa91c98a4d908555aac06695f46294c61e5f38dc28826b76c4c3",
];
const LEAF_HASH_HEX: [&str; 3] = [
    "b897bd228ea5b2821358534625accafbd54329b6bf967017d5acf555b3cc75a3",
    "e574a688e27084522d6cdd5b0905bc86fbdd3c69c0ea58686ee6e9bc69677f00",
    "90f9a0fe6301b0d9b3487fccbd457e2622ec07cfc9e22b46a4a2035831e7ad31",
];
const ROOT_HEX: [&str; 3] = [
    "b897bd228ea5b2821358534625accafbd54329b6bf967017d5acf555b3cc75a3",
    "bb1efb0d8e3be41dbc6fc40a833010cee75cb949e97de28ca03953275cdbd86c",
    "e1a3da171c0c872fe3bf724d64723b3a299d6824f3c092867ddd17d3a3341b50",
];
const SEGMENT_START_HEX: &str = "544d4c4544474552010100000000000000002f0526700000009e0100000000000000000000000000000000000000000000000000000000000000000000000000000000010000000d63686174636d706c2d303030310000000461636d65000000056b65792d3700000015536d6f6c4c4d322d3133354d2d496e737472756374000000000000000c0000000000000004000000000000001e013fd0000000000000000000006553f1001dcd6500000000006553f1010ee6b2806b3310ad";
const INCLUSION_1_OF_3_HEX: [&str; 2] = [
    "b897bd228ea5b2821358534625accafbd54329b6bf967017d5acf555b3cc75a3",
    "90f9a0fe6301b0d9b3487fccbd457e2622ec07cfc9e22b46a4a2035831e7ad31",
];
const CONSISTENCY_2_TO_3_HEX: [&str; 1] =
    ["90f9a0fe6301b0d9b3487fccbd457e2622ec07cfc9e22b46a4a2035831e7ad31"];
const SIGNED_NOTE: &str = "tokenmill.example/golden\n\
3\n\
4aPaFxwMhy/jv3JNZHI7OimdaCTzwJKGfd0X06M0G1A=\n\
time 1700000100000\n\
\n\
— tokenmill-golden /dLbd/cnuDMGkZMr3uExPJEKEQgBPeM2eB7C1bi8OD0kg/gmF71Xc2LJ9pE1SbEnX88/QYuDPV/uE3YQVEKNWXVVggs=\n\
";

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn bodies() -> [RecordBody; 3] {
    [
        RecordBody::Usage(UsageEvent {
            request_id: RequestId("chatcmpl-0001".into()),
            tenant: TenantId("acme".into()),
            key_id: KeyId("key-7".into()),
            model: "SmolLM2-135M-Instruct".into(),
            tokens: TokenCounts {
                prompt_tokens: 12,
                cached_prompt_tokens: 4,
                completion_tokens: 30,
            },
            finish_reason: FinishReason::Stop,
            device_seconds: 0.25,
            arrived_at: at(1_700_000_000, 500_000_000),
            finished_at: at(1_700_000_001, 250_000_000),
        }),
        RecordBody::Capacity(CapacityRecord {
            device: "cuda:0".into(),
            start: at(1_700_000_000, 0),
            end: at(1_700_000_010, 0),
            wall_seconds: 10.0,
            busy_seconds: 7.5,
            tokens: 4096,
            tenants: vec![
                TenantCapacity {
                    tenant: TenantId("acme".into()),
                    busy_seconds: 5.0,
                    tokens: 3000,
                },
                TenantCapacity {
                    tenant: TenantId("beta".into()),
                    busy_seconds: 2.5,
                    tokens: 1096,
                },
            ],
        }),
        RecordBody::Usage(UsageEvent {
            request_id: RequestId("chatcmpl-0002".into()),
            tenant: TenantId("beta".into()),
            key_id: KeyId("key-9".into()),
            model: "SmolLM2-135M-Instruct".into(),
            tokens: TokenCounts {
                prompt_tokens: 100,
                cached_prompt_tokens: 0,
                completion_tokens: 7,
            },
            finish_reason: FinishReason::Cancelled,
            device_seconds: 0.125,
            arrived_at: at(1_700_000_005, 0),
            finished_at: at(1_700_000_006, 1),
        }),
    ]
}

struct Computed {
    signer: Signer,
    records: Vec<Vec<u8>>,
    record_hashes: Vec<Hash>,
    leaves: Vec<Hash>,
    roots: Vec<Hash>,
    segment_start: Vec<u8>,
    note: String,
}

fn compute() -> Computed {
    let seed: [u8; 32] = from_hex(SEED_HEX)
        .and_then(|b| b.try_into().ok())
        .expect("seed");
    let signer = Signer::from_seed(KEY_NAME, seed).expect("key");
    let mut prev = Hash::ZERO;
    let mut records = Vec::new();
    let mut record_hashes = Vec::new();
    let mut leaves = Vec::new();
    let mut roots = Vec::new();
    let mut tree = CompactTree::new();
    for (seq, body) in bodies().iter().enumerate() {
        let mut bytes = Vec::new();
        encode_record(
            seq as u64,
            &prev,
            &body.encode().expect("encodes"),
            &mut bytes,
        );
        prev = record_hash(&bytes);
        record_hashes.push(prev);
        leaves.push(leaf_hash(&bytes));
        tree.push(leaf_hash(&bytes));
        roots.push(tree.root());
        records.push(bytes);
    }
    // The start of segment file 00000000000000000000.seg: header, then the
    // frame of record 0.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = tokenmill_metering::LedgerConfig::new(dir.path(), ORIGIN);
    let (ledger, _) = tokenmill_metering::Ledger::open(config, signer.clone()).expect("opens");
    for body in bodies() {
        let (tx, rx) = std::sync::mpsc::channel();
        ledger.append(&body, Box::new(move |r| drop(tx.send(r))));
        rx.recv().expect("callback").expect("durable");
    }
    ledger.close().expect("closes");
    let segment =
        std::fs::read(dir.path().join(tokenmill_metering::segment_name(0))).expect("segment");
    let segment_start = segment[..22 + 4 + records[0].len() + 4].to_vec();
    let checkpoint = Checkpoint {
        origin: ORIGIN.into(),
        size: 3,
        root: tree.root(),
        time_ms: Some(CHECKPOINT_TIME_MS),
        extensions: Vec::new(),
    };
    let note = checkpoint.sign(&signer).expect("signs");
    Computed {
        signer,
        records,
        record_hashes,
        leaves,
        roots,
        segment_start,
        note,
    }
}

#[test]
fn golden_vectors() {
    let c = compute();
    let verifier = c.signer.verifier();
    let inclusion = merkle::inclusion_proof(&c.leaves, 1, 3).expect("proof");
    let consistency = merkle::consistency_proof(&c.leaves, 2, 3).expect("proof");
    if std::env::var_os("GOLDEN_PRINT").is_some() {
        println!("public key   {}", to_hex(&verifier.public_key()));
        println!("key hash     {:08x}", verifier.key_hash());
        println!("verifier     {verifier}");
        println!("private      {}", c.signer.to_private_text());
        for i in 0..3 {
            println!("record {i}     {}", to_hex(&c.records[i]));
            println!("rec hash {i}   {}", c.record_hashes[i]);
            println!("leaf {i}       {}", c.leaves[i]);
            println!("root {}       {}", i + 1, c.roots[i]);
        }
        println!("segment      {}", to_hex(&c.segment_start));
        println!("inclusion    {inclusion:?}");
        println!("consistency  {consistency:?}");
        println!("note\n{}", c.note);
    }

    assert_eq!(to_hex(&verifier.public_key()), PUBLIC_KEY_HEX);
    assert_eq!(format!("{:08x}", verifier.key_hash()), KEY_HASH_HEX);
    assert_eq!(verifier.to_string(), VERIFIER_KEY);
    assert_eq!(c.signer.to_private_text(), PRIVATE_KEY);
    for i in 0..3 {
        assert_eq!(to_hex(&c.records[i]), RECORD_HEX[i], "record {i}");
        assert_eq!(
            c.record_hashes[i].to_hex(),
            RECORD_HASH_HEX[i],
            "record hash {i}"
        );
        assert_eq!(c.leaves[i].to_hex(), LEAF_HASH_HEX[i], "leaf hash {i}");
        assert_eq!(c.roots[i].to_hex(), ROOT_HEX[i], "root of {}", i + 1);
    }
    assert_eq!(to_hex(&c.segment_start), SEGMENT_START_HEX);
    let hex = |v: &[Hash]| v.iter().map(Hash::to_hex).collect::<Vec<_>>();
    assert_eq!(hex(&inclusion), INCLUSION_1_OF_3_HEX);
    assert_eq!(hex(&consistency), CONSISTENCY_2_TO_3_HEX);
    assert_eq!(c.note, SIGNED_NOTE);

    // The vectors decode to the records, and the note verifies with the
    // published verifier key alone.
    for (i, body) in bodies().into_iter().enumerate() {
        let bytes = from_hex(RECORD_HEX[i]).expect("hex");
        let record = Record::decode(&bytes).expect("decodes");
        assert_eq!(record.seq, i as u64);
        assert_eq!(record.body, body);
    }
    let key = VerifierKey::parse(VERIFIER_KEY).expect("verifier key");
    let (cp, _) = Checkpoint::open(SIGNED_NOTE, &[key]).expect("verifies");
    assert_eq!(cp.root.to_hex(), ROOT_HEX[2]);
}

#[test]
fn the_document_quotes_the_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ledger-format.md");
    let doc = std::fs::read_to_string(path).expect("docs/ledger-format.md");
    let squeezed: String = doc.chars().filter(|c| !c.is_whitespace()).collect();
    let mut quoted = vec![
        SEED_HEX,
        PUBLIC_KEY_HEX,
        KEY_HASH_HEX,
        VERIFIER_KEY,
        PRIVATE_KEY,
        SEGMENT_START_HEX,
    ];
    quoted.extend(RECORD_HEX);
    quoted.extend(RECORD_HASH_HEX);
    quoted.extend(LEAF_HASH_HEX);
    quoted.extend(ROOT_HEX);
    quoted.extend(INCLUSION_1_OF_3_HEX);
    quoted.extend(CONSISTENCY_2_TO_3_HEX);
    let domain = to_hex(tokenmill_metering::record::RECORD_HASH_DOMAIN);
    quoted.push(&domain);
    for v in quoted {
        assert!(
            squeezed.contains(v),
            "docs/ledger-format.md does not quote {v}"
        );
    }
    assert!(
        doc.contains(SIGNED_NOTE),
        "docs/ledger-format.md does not quote the signed note"
    );
}
