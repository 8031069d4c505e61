//! Checkpoints in the C2SP tlog-checkpoint format: the text a signed note
//! carries to commit to the first `size` records.
//!
//! ```text
//! <origin>
//! <tree size, decimal>
//! <root hash, base64>
//! time <unix milliseconds>
//! ```
//!
//! The first three lines are the standard body; `time` is an extension line
//! (the format allows opaque extension lines after the root) that says when
//! the writer made the checkpoint, since the design asks for it. Parsing is
//! strict so that one checkpoint has one text.

use crate::hash::Hash;
use crate::keys::{Signer, VerifierKey};
use crate::note::{self, NoteError};
use std::time::{SystemTime, UNIX_EPOCH};

/// A commitment to the first `size` records of a ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Names the ledger (a schema-less URL-like string, e.g.
    /// `tokenmill.example.com/ledger/eu-1`), so a checkpoint of one ledger
    /// cannot be passed off as one of another.
    pub origin: String,
    /// Number of records committed to.
    pub size: u64,
    /// Merkle root of those records.
    pub root: Hash,
    /// When it was made, in milliseconds since the Unix epoch (`time`
    /// extension line), if present.
    pub time_ms: Option<u64>,
    /// Other extension lines, kept verbatim.
    pub extensions: Vec<String>,
}

/// Why a checkpoint is malformed or untrusted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The signed note around it is malformed or its signatures fail.
    #[error(transparent)]
    Note(#[from] NoteError),
    /// The text is not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
}

impl Checkpoint {
    /// A checkpoint of `size` records with `root`, stamped now.
    pub fn new(origin: &str, size: u64, root: Hash) -> Checkpoint {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            time_ms,
            extensions: Vec::new(),
        }
    }

    /// The checkpoint text (every line ends in a newline).
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            self.root.to_base64()
        );
        if let Some(ms) = self.time_ms {
            text.push_str(&format!("time {ms}\n"));
        }
        for ext in &self.extensions {
            text.push_str(ext);
            text.push('\n');
        }
        text
    }

    /// Parses checkpoint text.
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(m.to_owned());
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("text must end in a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or_default();
        if !valid_origin(origin) {
            return Err(bad("origin line is empty or has control characters"));
        }
        let size = parse_decimal(lines.next().unwrap_or_default())
            .ok_or_else(|| bad("tree size is not a canonical decimal"))?;
        let root = Hash::from_base64(lines.next().unwrap_or_default())
            .ok_or_else(|| bad("root hash is not base64 of 32 bytes"))?;
        let mut time_ms = None;
        let mut extensions = Vec::new();
        for line in lines {
            if line.is_empty() {
                return Err(bad("empty extension line"));
            }
            match line.strip_prefix("time ") {
                Some(ms) if time_ms.is_none() && extensions.is_empty() => {
                    time_ms = Some(parse_decimal(ms).ok_or_else(|| bad("time is not a decimal"))?);
                }
                _ => extensions.push(line.to_owned()),
            }
        }
        let checkpoint = Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            time_ms,
            extensions,
        };
        // What does not print back the same is not the canonical text.
        if checkpoint.to_text() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(checkpoint)
    }

    /// The checkpoint as a signed note.
    pub fn sign(&self, signer: &Signer) -> Result<String, CheckpointError> {
        Ok(note::sign(&self.to_text(), signer)?)
    }

    /// Parses a signed checkpoint note and checks its signatures against
    /// `keys`; returns the checkpoint and the names of the keys that signed.
    pub fn open(
        signed_note: &str,
        keys: &[VerifierKey],
    ) -> Result<(Checkpoint, Vec<String>), CheckpointError> {
        let verified = note::open(signed_note, keys)?;
        Ok((Checkpoint::parse(&verified.text)?, verified.signed_by))
    }
}

/// Whether `origin` may be a checkpoint's origin line.
pub fn valid_origin(origin: &str) -> bool {
    !origin.is_empty() && !origin.chars().any(char::is_control)
}

/// Parses ASCII digits without sign or leading zeros ("0" alone is fine).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_strictness() {
        let cp = Checkpoint {
            origin: "example.com/ledger".into(),
            size: 12,
            root: Hash::of_parts(&[b"x"]),
            time_ms: Some(1_700_000_000_000),
            extensions: vec!["other ext".into()],
        };
        let text = cp.to_text();
        assert_eq!(Checkpoint::parse(&text), Ok(cp.clone()));
        for bad in [
            text.replace("\n12\n", "\n012\n"),
            text.replace("\n12\n", "\n+12\n"),
            text.replace("\n12\n", "\n\n"),
            text.trim_end().to_owned(),
            format!("{text}\n"),
            text.replace("example.com/ledger", ""),
        ] {
            assert!(Checkpoint::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signed_round_trip() {
        let signer = Signer::from_seed("k", [9; 32]).expect("valid");
        let cp = Checkpoint::new("o", 0, crate::merkle::empty_root());
        let note = cp.sign(&signer).expect("signs");
        let (back, by) = Checkpoint::open(&note, &[signer.verifier()]).expect("opens");
        assert_eq!(back, cp);
        assert_eq!(by, vec!["k".to_owned()]);
    }
}
