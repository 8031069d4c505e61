//! The body of an `add-checkpoint` request:
//!
//! ```text
//! old <size>
//! <consistency proof hash, base64>     (0 to 63 lines)
//!
//! <signed checkpoint note>
//! ```

use tokenmill_metering::hash::Hash;

/// Most consistency proof lines a request may carry (the protocol's limit;
/// a tree of 2^63 leaves needs no more).
pub const MAX_PROOF_LINES: usize = 63;

/// A parsed `add-checkpoint` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the client believes the witness last
    /// cosigned.
    pub old_size: u64,
    /// The consistency proof from `old_size` to the new checkpoint.
    pub proof: Vec<Hash>,
    /// The signed checkpoint note.
    pub note: String,
}

/// Why a request body is not an `add-checkpoint` request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The first line is not `old <decimal>`.
    #[error("the first line must be \"old <size>\" in canonical decimal")]
    OldSize,
    /// A proof line is not a base64 hash.
    #[error("proof line {0} is not a base64 SHA-256 hash")]
    ProofLine(usize),
    /// More than [`MAX_PROOF_LINES`] proof lines.
    #[error("more than {MAX_PROOF_LINES} consistency proof lines")]
    TooManyProofLines,
    /// No empty line before the checkpoint.
    #[error("no empty line between the proof and the checkpoint")]
    NoCheckpoint,
}

/// A canonical ASCII decimal: no sign, no leading zeroes (but "0").
fn parse_decimal(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

impl AddCheckpoint {
    /// Parses a request body.
    pub fn parse(body: &str) -> Result<AddCheckpoint, RequestError> {
        let (first, mut rest) = body.split_once('\n').ok_or(RequestError::OldSize)?;
        let old_size = first
            .strip_prefix("old ")
            .and_then(parse_decimal)
            .ok_or(RequestError::OldSize)?;
        let mut proof = Vec::new();
        loop {
            let (line, after) = rest.split_once('\n').ok_or(RequestError::NoCheckpoint)?;
            rest = after;
            if line.is_empty() {
                break;
            }
            if proof.len() == MAX_PROOF_LINES {
                return Err(RequestError::TooManyProofLines);
            }
            let hash = Hash::from_base64(line).ok_or(RequestError::ProofLine(proof.len() + 1))?;
            proof.push(hash);
        }
        Ok(AddCheckpoint {
            old_size,
            proof,
            note: rest.to_owned(),
        })
    }

    /// The request body (what a log sends).
    pub fn to_body(&self) -> String {
        let mut body = format!("old {}\n", self.old_size);
        for hash in &self.proof {
            body.push_str(&hash.to_base64());
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.note);
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips() {
        let request = AddCheckpoint {
            old_size: 20,
            proof: vec![Hash::of_parts(&[b"a"]), Hash::of_parts(&[b"b"])],
            note: "origin\n21\nROOT=\n\n\u{2014} origin SIG\n".into(),
        };
        assert_eq!(AddCheckpoint::parse(&request.to_body()), Ok(request));
        let first = AddCheckpoint::parse("old 0\n\nnote\n").unwrap();
        assert_eq!((first.old_size, first.proof.len()), (0, 0));
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        for (body, want) in [
            ("", RequestError::OldSize),
            ("old 01\n\n", RequestError::OldSize),
            ("old -1\n\n", RequestError::OldSize),
            ("new 1\n\n", RequestError::OldSize),
            ("old 1\nnot base64!\n\n", RequestError::ProofLine(1)),
            ("old 1\n", RequestError::NoCheckpoint),
        ] {
            assert_eq!(AddCheckpoint::parse(body), Err(want), "{body:?}");
        }
        let hash = Hash::of_parts(&[b"h"]).to_base64();
        let long = format!("old 1\n{}\nnote", format!("{hash}\n").repeat(64));
        assert_eq!(
            AddCheckpoint::parse(&long),
            Err(RequestError::TooManyProofLines)
        );
    }
}
