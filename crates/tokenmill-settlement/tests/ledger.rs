//! Settlement against real ledgers on disk: refusal of tampered ledgers,
//! identical statements from an exported and re-imported ledger, late
//! capacity, unpriced models and provisional statements.

mod common;

use common::{signer, LedgerSpec};
use tokenmill_metering::{export_jsonl_with_checkpoints, import_jsonl, LedgerConfig};
use tokenmill_settlement::{render, settle, source, Contract, Month, SettleError};

const CONTRACT: &str = r#"
id = "test"
currency = "EUR"
[parties]
cloud = "C"
backer = "B"
[term]
start = "2025-01-01"
period_months = 1
periods = 6
grace_hours = 24
[[revenue_share]]
from_period = 1
bps = 1000
[prices.m]
input = 1_000_000
cached_input = 100_000
output = 2_000_000
[capacity]
gpu_hours_per_month = 100
buyback_price_per_gpu_hour = 1_000_000
buyback_cap_per_month = 1_000_000_000
"#;

fn contract() -> Contract {
    Contract::parse(CONTRACT).expect("valid")
}

fn small_ledger() -> LedgerSpec {
    let mut l = LedgerSpec::default();
    l.usage("acme", "m", "2025-01-10T00:00:00Z", 1_000, 100, 500)
        .capacity(
            "2025-01-01T00:00:00Z",
            "2025-01-02T00:00:00Z",
            86_400.0,
            36_000.0,
        )
        .checkpoint("2025-02-01T01:00:00Z")
        // January capacity that arrives after January's cutoff (2 Feb).
        .capacity(
            "2025-01-31T00:00:00Z",
            "2025-02-01T00:00:00Z",
            86_400.0,
            0.25,
        )
        .usage("beta", "m", "2025-02-03T00:00:00Z", 2_000, 0, 1_000)
        .checkpoint("2025-02-10T00:00:00Z")
        .capacity(
            "2025-02-01T00:00:00Z",
            "2025-02-02T00:00:00Z",
            3_600.0,
            3_600.0,
        )
        .checkpoint("2025-03-01T12:00:00Z")
        .usage("acme", "m", "2025-03-02T00:00:00Z", 10, 0, 10)
        .checkpoint("2025-03-05T00:00:00Z");
    l
}

#[test]
fn a_tampered_ledger_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    small_ledger().write(dir.path(), &key);
    assert!(source::load(dir.path(), &[key.verifier()]).is_ok());

    let segment = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    // A byte inside the first record (past the 22-byte file header and the
    // 4-byte frame length).
    bytes[60] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    match source::load(dir.path(), &[key.verifier()]) {
        Err(SettleError::Verify(e)) => {
            assert_eq!(e.seq, Some(0), "names the first bad record: {e}");
            assert!(e.to_string().contains("checksum"), "{e}");
        }
        other => panic!("expected a verification failure, got {other:?}"),
    }

    // A ledger signed by another key is refused too.
    let dir = tempfile::tempdir().expect("tempdir");
    small_ledger().write(dir.path(), &key);
    let stranger = tokenmill_metering::Signer::from_seed("stranger", [7; 32]).expect("key");
    assert!(matches!(
        source::load(dir.path(), &[stranger.verifier()]),
        Err(SettleError::Verify(_))
    ));
}

#[test]
fn an_exported_and_reimported_ledger_settles_identically() {
    let key = signer();
    let original = tempfile::tempdir().expect("tempdir");
    let spec = {
        let mut l = small_ledger();
        // Floats that are not short decimals must survive JSON too.
        l.capacity(
            "2025-02-02T00:00:00Z",
            "2025-02-03T00:00:00Z",
            0.1 + 0.2,
            1.0 / 3.0,
        )
        .usage("acme", "m", "2025-02-04T00:00:00Z", 7, 3, 11)
        .checkpoint("2025-03-06T00:00:00Z");
        l
    };
    spec.write(original.path(), &key);

    let mut jsonl = Vec::new();
    export_jsonl_with_checkpoints(original.path(), &mut jsonl).expect("export");
    let copy = tempfile::tempdir().expect("tempdir");
    let target = copy.path().join("ledger");
    import_jsonl(
        &mut jsonl.as_slice(),
        LedgerConfig::new(&target, common::ORIGIN),
        &[key.verifier()],
    )
    .expect("import");

    let a = source::load(original.path(), &[key.verifier()]).expect("original");
    let b = source::load(&target, &[key.verifier()]).expect("reimported");
    assert_eq!(a, b);
    let c = contract();
    for month in ["2025-01", "2025-02", "2025-03"] {
        let m = Month::parse(month).expect("month");
        let sa = render::json(&settle(&c, &a, m).expect("settles"));
        let sb = render::json(&settle(&c, &b, m).expect("settles"));
        assert_eq!(sa, sb, "{month}");
        assert_eq!(render::csv(&settle(&c, &b, m).expect("settles")), {
            render::csv(&settle(&c, &a, m).expect("settles"))
        });
    }

    // An edited line is refused, not imported under a new hash.
    let text = String::from_utf8(jsonl).expect("utf-8");
    let edited = text.replacen("\"completion_tokens\":500", "\"completion_tokens\":5000", 1);
    assert_ne!(edited, text);
    let again = copy.path().join("edited");
    let err = import_jsonl(
        &mut edited.as_bytes(),
        LedgerConfig::new(&again, common::ORIGIN),
        &[key.verifier()],
    )
    .expect_err("edited record");
    assert!(err.to_string().contains("hash to"), "{err}");
}

#[test]
fn late_capacity_reopens_its_month() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    small_ledger().write(dir.path(), &key);
    let ledger = source::load(dir.path(), &[key.verifier()]).expect("ledger");
    let c = contract();

    let jan = settle(&c, &ledger, Month::parse("2025-01").expect("m")).expect("jan");
    let cap = jan.capacity.as_ref().expect("capacity clause");
    assert_eq!(cap.lines.len(), 1);
    // 24 h up, 10 h sold: idle 14 h; committed 100 h, short 90 h: 14 h unsold.
    let f = &cap.lines[0].figures;
    assert_eq!(f.wall_micro_gpu_hours, 24_000_000);
    assert_eq!(f.sold_micro_gpu_hours, 10_000_000);
    assert_eq!(f.unsold_micro_gpu_hours, 14_000_000);
    assert_eq!(cap.total, 14_000_000);
    assert_eq!(
        jan.checkpoint
            .as_ref()
            .expect("cutoff checkpoint")
            .tree_size,
        2
    );

    let feb = settle(&c, &ledger, Month::parse("2025-02").expect("m")).expect("feb");
    assert_eq!(feb.records.capacity_late, 1);
    let cap = feb.capacity.as_ref().expect("capacity clause");
    assert_eq!(
        cap.lines.len(),
        2,
        "an adjustment of January, then February"
    );
    let adj = &cap.lines[0];
    assert_eq!(adj.month, "2025-01");
    let late = adj.late.as_ref().expect("late");
    assert_eq!(late.month, "2025-01");
    assert_eq!(late.missing_from.as_ref().expect("cited").tree_size, 2);
    // January again: 48 h up, 10 h + 0.25 s sold. 0.25 s = 69.44... micro-GPU-hours.
    assert_eq!(adj.figures.wall_micro_gpu_hours, 48_000_000);
    assert_eq!(adj.figures.sold_micro_gpu_hours, 10_000_069);
    assert_eq!(adj.figures.unsold_micro_gpu_hours, 37_999_931);
    assert_eq!(adj.figures.buyback, 37_999_931);
    assert_eq!(adj.previously_settled, 14_000_000);
    assert_eq!(adj.amount, 23_999_931);
    // February itself: 1 h up, all sold; committed 100 h (not pro-rated:
    // the whole month is in the term).
    let own = &cap.lines[1];
    assert!(own.late.is_none());
    assert_eq!(own.figures.committed_micro_gpu_hours, 100_000_000);
    assert_eq!(own.amount, 0);
    assert_eq!(cap.total, 23_999_931);
    assert_eq!(feb.net.backer_owes_cloud, 23_999_931);
}

#[test]
fn statements_are_provisional_until_a_checkpoint_passes_the_cutoff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    small_ledger().write(dir.path(), &key);
    let ledger = source::load(dir.path(), &[key.verifier()]).expect("ledger");
    let c = contract();
    let feb = settle(&c, &ledger, Month::parse("2025-02").expect("m")).expect("feb");
    assert!(
        feb.is_final,
        "the 5 March checkpoint is after the 2 March cutoff"
    );
    let mar = settle(&c, &ledger, Month::parse("2025-03").expect("m")).expect("mar");
    assert!(!mar.is_final, "no checkpoint after the 2 April cutoff yet");
    assert_eq!(mar.revenue.total, 30);
    let err = settle(&c, &ledger, Month::parse("2025-07").expect("m")).expect_err("outside");
    assert!(
        err.to_string()
            .contains("not a month of the contract's term"),
        "{err}"
    );
}

#[test]
fn an_unpriced_model_is_an_error_naming_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    let mut l = small_ledger();
    l.usage("acme", "unknown-model", "2025-03-01T00:00:00Z", 1, 0, 1)
        .checkpoint("2025-03-06T00:00:00Z");
    l.write(dir.path(), &key);
    let ledger = source::load(dir.path(), &[key.verifier()]).expect("ledger");
    let err =
        settle(&contract(), &ledger, Month::parse("2025-03").expect("m")).expect_err("unpriced");
    assert!(
        matches!(err, SettleError::UnpricedModel { seq: 6, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unknown-model"), "{err}");
    // Months before it still settle.
    assert!(settle(&contract(), &ledger, Month::parse("2025-02").expect("m")).is_ok());
}

#[test]
fn the_example_contract_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/contract.toml");
    let c = Contract::load(&path).expect("examples/contract.toml");
    assert_eq!(c.prices.len(), 2);
    assert_eq!(c.credits.len(), 2);
    assert_eq!(c.bps_for_period(4), 2000);
    assert_eq!(c.bps_for_period(5), 1500);
    assert_eq!(c.bps_for_period(12), 1000);
    // Unknown keys are refused, with the key named.
    let text = std::fs::read_to_string(&path).expect("read");
    let with_typo = text.replace("grace_hours", "grace_hour");
    let err = Contract::parse(&with_typo).expect_err("typo");
    assert!(err.to_string().contains("grace_hour"), "{err}");
    let err = Contract::parse(&format!("{text}\nsurprise = 1\n")).expect_err("unknown key");
    assert!(err.to_string().contains("surprise"), "{err}");
}
