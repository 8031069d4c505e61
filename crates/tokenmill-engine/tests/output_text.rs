//! Incremental output text on the real SmolLM2 tokenizer: stop strings that
//! span tokens, characters split over byte-level tokens, held-back text.

use std::sync::OnceLock;
use tokenmill_engine::output::OutputText;
use tokenmill_models::{catalog, ModelTokenizer};

fn tokenizer() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = catalog::find("smollm2").expect("known").path();
        ModelTokenizer::from_gguf_file(&path).expect("run models/fetch-smollm2.sh")
    })
}

/// Feeds the tokens of `text` one by one; returns each step's delta text, the
/// joined output and whether a stop string ended it.
fn run(text: &str, stops: &[&str]) -> (Vec<String>, String, bool) {
    let t = tokenizer();
    let ids = t.encode_raw(text).unwrap();
    let mut out = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
    let mut deltas = Vec::new();
    for id in ids {
        let d = out.push(t, id);
        deltas.push(d.text);
        if d.stopped {
            return (deltas.clone(), deltas.concat(), true);
        }
    }
    deltas.push(out.finish(t).text);
    (deltas.clone(), deltas.concat(), false)
}

#[test]
fn without_stops_the_output_is_the_decoded_text() {
    let text = "Hello, world! 1234 ünïcödé 🦀🇫🇷 日本語 fn main() {}";
    let (_, joined, stopped) = run(text, &[]);
    assert_eq!(joined, text);
    assert!(!stopped);
}

#[test]
fn a_stop_string_spanning_tokens_ends_the_text_before_it() {
    let text = "The quick brown fox jumps over the lazy dog";
    // "brown fox" spans at least two tokens.
    assert!(tokenizer().encode_raw("brown fox").unwrap().len() >= 2);
    let (_, joined, stopped) = run(text, &["brown fox"]);
    assert!(stopped);
    assert_eq!(joined, "The quick ");
}

#[test]
fn a_stop_string_inside_a_token_cuts_mid_token() {
    let (_, joined, stopped) = run("The quick brown fox", &["ui"]);
    assert!(stopped);
    assert_eq!(joined, "The q");
}

#[test]
fn the_earliest_stop_wins_and_near_misses_are_released() {
    let (_, joined, stopped) = run("one two three four", &["four", "two t"]);
    assert!(stopped);
    assert_eq!(joined, "one ");
    // "thr" is a prefix of the stop "three!", held back, then released at the end.
    let (deltas, joined, stopped) = run("one two thr", &["three!"]);
    assert!(!stopped);
    assert_eq!(joined, "one two thr");
    assert!(deltas.last().unwrap().contains("thr"), "{deltas:?}");
}

#[test]
fn a_character_split_over_tokens_is_never_sent_in_halves() {
    // Emoji are several byte-level tokens each.
    let text = "🦀🦀";
    assert!(tokenizer().encode_raw(text).unwrap().len() > 2);
    let (deltas, joined, _) = run(text, &[]);
    assert_eq!(joined, text);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
}
