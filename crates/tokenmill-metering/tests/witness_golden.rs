//! The witness test vectors of docs/ledger-format.md (section 9): a fixed
//! witness key cosigning the golden checkpoint of section 8.5 at a fixed
//! time. The test asserts the values and that the document quotes them.
//!
//! `GOLDEN_PRINT=1 cargo test -p tokenmill-metering --test witness_golden -- --nocapture`
//! prints them.

use tokenmill_metering::cosignature::{cosignatures, signed_message, Cosigner, CosignerKey};
use tokenmill_metering::hash::from_hex;
use tokenmill_metering::keys::Signer;
use tokenmill_metering::note;

const WITNESS_SEED_HEX: &str = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";
const WITNESS_NAME: &str = "witness.example/golden";
const TIMESTAMP: u64 = 1_700_000_200;
/// The checkpoint text of section 8.5.
const CHECKPOINT_TEXT: &str = "tokenmill.example/golden\n3\n4aPaFxwMhy/jv3JNZHI7OimdaCTzwJKGfd0X06M0G1A=\ntime 1700000100000\n";

const WITNESS_KEY: &str =
    "witness.example/golden+51ee31f8+BCmsuuFBvMrwsi4alNNNC8c2HlJtC/4SyJeUvJMilm3X";
const KEY_ID_HEX: &str = "51ee31f8";
const COSIGNATURE_LINE: &str = "— witness.example/golden Ue4x+AAAAABlU/HIP3/j46pxTURKTbw7zl5g+5+RvKKzDeLfrFy3xjxe1h00WVJKEIxPqbb3zWvkoqKIH4tkSvHhEyBhMsKTvLkPAA==";

fn cosigner() -> Cosigner {
    let seed: [u8; 32] = from_hex(WITNESS_SEED_HEX)
        .and_then(|b| b.try_into().ok())
        .expect("seed");
    Cosigner::from_signer(&Signer::from_seed(WITNESS_NAME, seed).expect("key"))
}

#[test]
fn witness_vectors() {
    let w = cosigner();
    let key = w.public();
    let line = w.cosign(CHECKPOINT_TEXT, TIMESTAMP);
    if std::env::var_os("GOLDEN_PRINT").is_some() {
        println!("key {}", key.to_text());
        println!("id {:08x}", key.key_id());
        println!(
            "message {:?}",
            String::from_utf8_lossy(&signed_message(CHECKPOINT_TEXT, TIMESTAMP))
        );
        println!("line {line:?}");
        return;
    }
    assert_eq!(key.to_text(), WITNESS_KEY);
    assert_eq!(format!("{:08x}", key.key_id()), KEY_ID_HEX);
    assert_eq!(line, format!("{COSIGNATURE_LINE}\n"));
    // The documented line verifies with the documented key.
    let parsed = note::parse(&format!("{CHECKPOINT_TEXT}\n{COSIGNATURE_LINE}\n")).unwrap();
    let key = CosignerKey::parse(WITNESS_KEY).unwrap();
    let found = cosignatures(&parsed.text, &parsed.signatures, &[key]).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].timestamp, TIMESTAMP);
}

#[test]
fn the_document_quotes_the_witness_vectors() {
    let doc = include_str!("../../../docs/ledger-format.md");
    for value in [WITNESS_SEED_HEX, WITNESS_KEY, KEY_ID_HEX, COSIGNATURE_LINE] {
        assert!(
            doc.contains(value),
            "docs/ledger-format.md does not quote {value}"
        );
    }
}
