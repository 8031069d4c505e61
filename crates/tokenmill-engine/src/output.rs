//! Turns generated token ids into output text, incrementally: complete UTF-8
//! only, stop strings matched across token boundaries and cut from the text.

use tokenmill_models::ModelTokenizer;

/// What the output needs of a tokenizer: ids back to text. A trait so that
/// the output's logic is tested on a toy vocabulary as well as the model's.
pub trait Detokenizer {
    /// The text of `ids` decoded together (byte-level pieces merged);
    /// incomplete UTF-8 reads as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// The bytes of one token (part of a UTF-8 character, possibly).
    fn token_bytes(&self, id: u32) -> Vec<u8>;
}

impl Detokenizer for ModelTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        // An id the vocabulary lacks decodes to nothing rather than failing
        // the request: the model only draws ids of its own vocabulary.
        ModelTokenizer::decode(self, ids).unwrap_or_default()
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        ModelTokenizer::token_bytes(self, id)
    }
}

/// What one new token did to the output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextDelta {
    /// Text that is now final and can be sent.
    pub text: String,
    /// Whether a stop string was completed (the text stops before it).
    pub stopped: bool,
}

/// The growing output of one sequence.
pub struct OutputText {
    stop_strings: Vec<String>,
    /// Token ids decoded so far (the sequence's generated tokens).
    ids: Vec<u32>,
    /// Decoding restarts at this id so that byte-level pieces merge correctly.
    prefix_offset: usize,
    /// Ids before this one are reflected in `text`.
    read_offset: usize,
    /// All output text decoded so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
}

/// The replacement character the decoder writes for incomplete UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

impl OutputText {
    /// Output with the given stop strings (empty ones are ignored).
    pub fn new(stop_strings: Vec<String>) -> Self {
        OutputText {
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends a generated token; returns the text that became final.
    pub fn push(&mut self, tokenizer: &(impl Detokenizer + ?Sized), id: u32) -> TextDelta {
        self.ids.push(id);
        let new = self.unread_text(tokenizer);
        // Wait for the rest of a character split over tokens.
        if !new.is_empty() && !new.ends_with(REPLACEMENT) {
            self.text.push_str(&new);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        self.release(false)
    }

    /// Ends the output without a stop string: everything held back is final.
    pub fn finish(&mut self, tokenizer: &(impl Detokenizer + ?Sized)) -> TextDelta {
        let new = self.unread_text(tokenizer);
        self.text.push_str(&new);
        self.read_offset = self.ids.len();
        self.release(true)
    }

    /// Text the ids after `read_offset` add, decoded together with the ids
    /// from `prefix_offset` so byte-level pieces merge as they should.
    fn unread_text(&self, tokenizer: &(impl Detokenizer + ?Sized)) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let after = tokenizer.decode(&self.ids[self.prefix_offset..]);
        after.get(before.len()..).unwrap_or_default().to_owned()
    }

    /// Hands out the text that can no longer be part of a stop string.
    fn release(&mut self, at_end: bool) -> TextDelta {
        let pending = &self.text[self.emitted..];
        let hit = self
            .stop_strings
            .iter()
            .filter_map(|s| pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let end = self.emitted + at;
            let text = self.text[self.emitted..end].to_owned();
            self.text.truncate(end);
            self.emitted = end;
            return TextDelta {
                text,
                stopped: true,
            };
        }
        let held = if at_end { 0 } else { self.held_back(pending) };
        let end = self.text.len() - held;
        let text = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        TextDelta {
            text,
            stopped: false,
        }
    }

    /// Bytes at the end of `pending` that could begin a stop string.
    fn held_back(&self, pending: &str) -> usize {
        self.stop_strings
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|k| stop.is_char_boundary(*k))
                    .find(|k| pending.ends_with(&stop[..*k]))
            })
            .max()
            .unwrap_or(0)
    }

    /// The final text handed out so far.
    pub fn emitted_text(&self) -> &str {
        &self.text[..self.emitted]
    }
}
