//! How a ledger is laid out in a JetStream stream: the stream's subjects,
//! each message's subject, message id and headers. The exporter and
//! [`crate::pull`] share this, and a third party reading the stream needs
//! nothing else (with docs/ledger-format.md for the payloads).

use sha2::{Digest, Sha256};
use tokenmill_metering::Hash;

/// Header holding a record's sequence number, so that a consumer can order
/// and count records without decoding them.
pub const HEADER_SEQ: &str = "Tokenmill-Seq";
/// Header holding a checkpoint's tree size.
pub const HEADER_SIZE: &str = "Tokenmill-Tree-Size";

/// The subjects and ids of one ledger's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLayout {
    stream: String,
}

/// Longest stream name accepted (JetStream allows more; a name this long is
/// already a mistake, and it ends up in every subject).
const MAX_NAME: usize = 64;

/// A stream name [`StreamLayout::new`] refuses: empty, longer than 64
/// bytes, or holding a byte other than an ASCII letter, digit, `-` or `_`
/// (it would break the subjects the name is a token of).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stream name {name:?}: use 1 to {MAX_NAME} ASCII letters, digits, '-' or '_'")]
pub struct InvalidStreamName {
    /// The name as given.
    pub name: String,
}

impl StreamLayout {
    /// The layout of stream `stream`. The name is also a subject token, so
    /// it is limited to ASCII letters, digits, `-` and `_` (JetStream itself
    /// forbids `.`, `*`, `>`, white space and path separators in names).
    pub fn new(stream: &str) -> Result<StreamLayout, InvalidStreamName> {
        let ok = !stream.is_empty()
            && stream.len() <= MAX_NAME
            && stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(InvalidStreamName {
                name: stream.to_owned(),
            });
        }
        Ok(StreamLayout {
            stream: stream.to_owned(),
        })
    }

    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subjects the stream is created with: `tokenmill.ledger.NAME.>`.
    pub fn stream_subjects(&self) -> String {
        format!("{}.>", self.prefix())
    }

    fn prefix(&self) -> String {
        format!("tokenmill.ledger.{}", self.stream)
    }

    /// Subject of record messages.
    pub fn record_subject(&self) -> String {
        format!("{}.record", self.prefix())
    }

    /// Subject of checkpoint messages.
    pub fn checkpoint_subject(&self) -> String {
        format!("{}.checkpoint", self.prefix())
    }

    /// Subject of cosigned checkpoint messages (a checkpoint note with a
    /// witness's cosignature lines, from the ledger's cosignatures file).
    pub fn cosigned_subject(&self) -> String {
        format!("{}.cosigned", self.prefix())
    }

    /// The message id of a record: its record hash in hex, the record's id
    /// (docs/ledger-format.md, 1.4). The same record always gets the same
    /// id, whoever sends it and however often, which is what lets the
    /// stream drop a resent copy; and two different records never share
    /// one, so a dedupe can never hide a record.
    pub fn record_msg_id(hash: &Hash) -> String {
        hash.to_hex()
    }

    /// The message id of a checkpoint note: `checkpoint/<tree size>/<first
    /// 16 hex digits of SHA-256 of the note>`. The size makes it readable;
    /// the digest keeps two different notes of one size (say, signed by two
    /// keys) from deduplicating each other.
    pub fn checkpoint_msg_id(size: u64, note: &str) -> String {
        format!("checkpoint/{size}/{}", short_digest(note))
    }

    /// The message id of a cosigned checkpoint note:
    /// `cosigned/<tree size>/<first 16 hex digits of SHA-256 of the note>`
    /// (each witness's cosignature makes another note).
    pub fn cosigned_msg_id(size: u64, note: &str) -> String {
        format!("cosigned/{size}/{}", short_digest(note))
    }
}

/// The first 16 hex digits of SHA-256 of `text`.
fn short_digest(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(16);
    for b in &digest[..8] {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_subjects() {
        let l = StreamLayout::new("usage-eu_1").expect("valid");
        assert_eq!(l.stream_subjects(), "tokenmill.ledger.usage-eu_1.>");
        assert_eq!(l.record_subject(), "tokenmill.ledger.usage-eu_1.record");
        assert_eq!(
            l.checkpoint_subject(),
            "tokenmill.ledger.usage-eu_1.checkpoint"
        );
    }

    #[test]
    fn names_that_would_break_subjects_are_refused() {
        for bad in ["", "a.b", "a*", "a>", "a b", "a/b", &"x".repeat(65)] {
            assert!(StreamLayout::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn checkpoint_ids_tell_notes_of_one_size_apart() {
        let a = StreamLayout::checkpoint_msg_id(10, "note a");
        let b = StreamLayout::checkpoint_msg_id(10, "note b");
        assert!(a.starts_with("checkpoint/10/"));
        assert_eq!(a.len(), "checkpoint/10/".len() + 16);
        assert_ne!(a, b);
        assert_eq!(a, StreamLayout::checkpoint_msg_id(10, "note a"));
    }
}
