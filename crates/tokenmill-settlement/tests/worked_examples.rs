//! docs/contract.md's worked examples, checked against the program: the
//! contract is read from the document, the ledger of its section 4.2 is
//! written to disk and verified, and every hand-computed figure of section
//! 4.6 and every printed statement of section 4.7 must match what
//! `settle` computes.
//!
//! To refresh the printed statements after a deliberate change of the table
//! layout, run with `UPDATE_WORKED_EXAMPLES=1`; the figures are never
//! rewritten: they are the hand computation.

mod common;

use common::{signer, LedgerSpec};
use std::path::PathBuf;
use tokenmill_settlement::{render, settle, source, Contract, Month};

const MONTHS: [&str; 3] = ["2025-01", "2025-02", "2025-03"];

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/contract.md")
}

/// The fenced block that follows `marker`, and its byte range in `doc`.
fn block_after(doc: &str, marker: &str) -> (std::ops::Range<usize>, String) {
    let at = doc
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} missing from the doc"));
    let open = at + doc[at..].find("```").expect("a fenced block follows");
    let body = open + doc[open..].find('\n').expect("fence line") + 1;
    let close = body + doc[body..].find("```").expect("closing fence");
    (body..close, doc[body..close].to_owned())
}

/// The ledger of section 4.2.
pub fn worked_ledger() -> LedgerSpec {
    let mut l = LedgerSpec::default();
    let m = "smollm2";
    l.usage(
        "acme",
        m,
        "2025-01-20T10:00:00Z",
        6_000_010,
        2_000_010,
        1_000_000,
    )
    .usage("beta", m, "2025-01-25T12:00:00Z", 10_000_030, 30, 2_500_000)
    .capacity(
        "2025-01-15T00:00:00Z",
        "2025-01-24T16:00:00Z",
        835_200.0,
        540_000.0,
    )
    .capacity(
        "2025-01-25T00:00:00Z",
        "2025-02-01T00:00:00Z",
        604_800.0,
        388_800.0,
    )
    .checkpoint("2025-02-01T00:10:00Z")
    .usage("beta", m, "2025-01-31T23:00:00Z", 500_000, 0, 250_000)
    .checkpoint("2025-02-05T00:00:00Z")
    .usage("acme", m, "2025-02-10T09:00:00Z", 3_000_000, 0, 1_000_000)
    .usage("beta", m, "2025-02-14T23:59:59Z", 1_000_000, 0, 1_000_000)
    .usage("beta", m, "2025-02-15T00:00:00Z", 1_000_000, 0, 1_000_000)
    .usage("acme", m, "2025-02-20T15:30:00Z", 5_000_000, 0, 2_000_000)
    .capacity(
        "2025-02-01T00:00:00Z",
        "2025-03-01T00:00:00Z",
        2_419_200.0,
        799_200.0,
    )
    .checkpoint("2025-03-01T00:10:00Z")
    .usage("acme", m, "2025-03-12T08:00:00Z", 10_000_000, 0, 2_500_000)
    .capacity(
        "2025-03-01T00:00:00Z",
        "2025-04-01T00:00:00Z",
        2_678_400.0,
        2_678_400.0,
    )
    .checkpoint("2025-04-01T00:10:00Z")
    .capacity(
        "2025-04-01T00:00:00Z",
        "2025-04-02T00:00:00Z",
        86_400.0,
        0.0,
    )
    .checkpoint("2025-04-04T00:00:00Z");
    l
}

/// A figure of the doc's table as JSON: `1.500000` is micro-units, a bare
/// integer is an integer, `-` is absent, anything else a string.
fn expected_value(cell: &str) -> Option<serde_json::Value> {
    if cell == "-" {
        return None;
    }
    if let Some((units, micros)) = cell.split_once('.') {
        assert_eq!(micros.len(), 6, "{cell}: amounts have six decimals");
        let units: i64 = units.parse().expect("units");
        let micros: i64 = micros.parse().expect("micro-units");
        return Some(serde_json::json!(units * 1_000_000 + micros));
    }
    Some(match cell.parse::<i64>() {
        Ok(n) => serde_json::json!(n),
        Err(_) => serde_json::json!(cell),
    })
}

fn lookup<'a>(json: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(json, |v, key| v.get(key))
}

#[test]
fn the_worked_examples_match_the_program() {
    let doc = std::fs::read_to_string(doc_path()).expect("docs/contract.md");
    let (_, contract_text) = block_after(&doc, "<!-- worked-example:contract -->");
    let contract = Contract::parse(&contract_text).expect("the doc's contract is valid");

    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    worked_ledger().write(dir.path(), &key);
    let ledger = source::load(dir.path(), &[key.verifier()]).expect("verified ledger");

    let statements: Vec<serde_json::Value> = MONTHS
        .iter()
        .map(|m| {
            let s = settle(&contract, &ledger, Month::parse(m).expect("month")).expect("settles");
            serde_json::from_str(&render::json(&s)).expect("json")
        })
        .collect();

    // Section 4.6: every hand-computed figure.
    let table = &doc[doc
        .find("<!-- worked-example:figures -->")
        .expect("figures table")..];
    let mut rows = table.lines().skip(1).take_while(|l| l.starts_with('|'));
    let header: Vec<&str> = rows
        .next()
        .expect("header")
        .split('|')
        .map(str::trim)
        .collect();
    assert_eq!(
        &header[2..5],
        &MONTHS,
        "figure columns are the three months"
    );
    let mut checked = 0;
    for row in rows.skip(1) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let path = cells[1].trim_matches('`');
        for (i, month) in MONTHS.iter().enumerate() {
            let want = expected_value(cells[2 + i]);
            let got = lookup(&statements[i], path);
            assert_eq!(
                got,
                want.as_ref(),
                "{path} of {month}: doc says {}",
                cells[2 + i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} figures found in the doc");

    // Section 4.7: the printed statements.
    let mut updated = doc.clone();
    let update = std::env::var_os("UPDATE_WORKED_EXAMPLES").is_some();
    for month in MONTHS.iter().rev() {
        let s = settle(&contract, &ledger, Month::parse(month).expect("month")).expect("settles");
        let printed = render::text(&s);
        let (range, in_doc) =
            block_after(&updated, &format!("<!-- worked-example:table {month} -->"));
        if update {
            updated.replace_range(range, &printed);
        } else {
            assert_eq!(
                in_doc, printed,
                "the doc's printed statement of {month} differs"
            );
        }
    }
    if update {
        std::fs::write(doc_path(), updated).expect("rewrite the doc");
    }
}

#[test]
fn csv_and_json_carry_the_same_figures() {
    let doc = std::fs::read_to_string(doc_path()).expect("docs/contract.md");
    let (_, contract_text) = block_after(&doc, "<!-- worked-example:contract -->");
    let contract = Contract::parse(&contract_text).expect("valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = signer();
    worked_ledger().write(dir.path(), &key);
    let ledger = source::load(dir.path(), &[key.verifier()]).expect("verified ledger");
    let s = settle(&contract, &ledger, Month::parse("2025-02").expect("m")).expect("settles");

    let csv = render::csv(&s);
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0].join(","), render::CSV_HEADER);
    assert!(
        rows.iter().all(|r| r.len() == 10),
        "ten fields on every row"
    );
    let amount = |section: &str| -> Vec<i64> {
        rows.iter()
            .filter(|r| r[1] == section)
            .map(|r| r[9].parse().expect("integer amount"))
            .collect()
    };
    let revenue = amount("revenue");
    assert_eq!(revenue.len(), s.revenue.lines.len());
    assert_eq!(revenue.iter().sum::<i64>(), amount("revenue_total")[0]);
    assert_eq!(amount("revenue_total")[0], s.revenue.total);
    assert_eq!(
        amount("revenue_share").iter().sum::<i64>(),
        s.revenue_share.total
    );
    assert_eq!(amount("buyback_total"), vec![500_000_000]);
    assert_eq!(amount("recoupment"), vec![1_350_000]);
    let checkpoint = &rows[1];
    assert_eq!(checkpoint[1], "checkpoint");
    assert_eq!(checkpoint[2], s.checkpoint.as_ref().expect("named").root);
    assert_eq!(checkpoint[7], "10");
    assert!(
        csv.contains(",net,backer_pays_cloud,,,,,,,498870000\n"),
        "{csv}"
    );
    // The same inputs give the same bytes.
    let again = settle(&contract, &ledger, Month::parse("2025-02").expect("m")).expect("settles");
    assert_eq!(render::csv(&again), csv);
    assert_eq!(render::json(&again), render::json(&s));
}
