//! C2SP signed notes: a text, a blank line, and signature lines
//! `— <key name> <base64(key hash || signature)>`.
//!
//! A note can carry signatures by several keys, which is how key rotation
//! works: a verifier holding any one of the listed keys accepts it, and
//! signatures by keys it does not know are skipped. A signature by a key it
//! does know must be valid, or the whole note is refused.

use crate::keys::{Signer, VerifierKey};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// What starts a signature line: an em dash (U+2014) and a space.
pub const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// Most signature lines a note may carry; more is treated as malformed, so a
/// hostile note cannot make a verifier do unbounded work.
pub const MAX_SIGNATURES: usize = 100;

/// Why a note is malformed or not trusted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The note is not in signed-note form.
    #[error("malformed note: {0}")]
    Malformed(String),
    /// A key the verifier knows signed, but the signature does not check.
    #[error("invalid signature by key {0}")]
    BadSignature(String),
    /// No signature is by a key the verifier knows.
    #[error("no signature by a known key (signed by: {0})")]
    UnknownSigners(String),
}

/// One signature line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteSignature {
    /// The key name on the line.
    pub name: String,
    /// The key hash (first 4 decoded bytes).
    pub key_hash: u32,
    /// The signature bytes after the key hash.
    pub signature: Vec<u8>,
}

/// A parsed, not yet verified, note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The signed text, ending in a newline.
    pub text: String,
    /// Its signature lines, in order.
    pub signatures: Vec<NoteSignature>,
}

/// Whether `text` may be the text of a note: it ends in a newline and holds
/// no control characters besides newlines.
fn valid_text(text: &str) -> bool {
    text.ends_with('\n') && !text.chars().any(|c| c.is_control() && c != '\n')
}

/// Signs `text` (which must end in a newline) and returns the whole note:
/// text, blank line, one signature line.
pub fn sign(text: &str, signer: &Signer) -> Result<String, NoteError> {
    if !valid_text(text) {
        return Err(NoteError::Malformed(
            "note text must end in a newline and hold no control characters".into(),
        ));
    }
    let mut raw = Vec::with_capacity(68);
    raw.extend_from_slice(&signer.key_hash().to_be_bytes());
    raw.extend_from_slice(&signer.sign(text.as_bytes()));
    Ok(format!(
        "{text}\n{SIGNATURE_PREFIX}{} {}\n",
        signer.name(),
        BASE64.encode(&raw)
    ))
}

/// Parses a signed note without checking signatures.
pub fn parse(note: &str) -> Result<Note, NoteError> {
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed("control character in note".into()));
    }
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
    let text = &note[..split + 1];
    let sigs = &note[split + 2..];
    let Some(sigs) = sigs.strip_suffix('\n') else {
        return Err(NoteError::Malformed(
            "note does not end in a newline".into(),
        ));
    };
    let mut signatures = Vec::new();
    for line in sigs.split('\n') {
        if signatures.len() == MAX_SIGNATURES {
            return Err(NoteError::Malformed("too many signatures".into()));
        }
        signatures.push(parse_signature_line(line)?);
    }
    Ok(Note {
        text: text.to_owned(),
        signatures,
    })
}

fn parse_signature_line(line: &str) -> Result<NoteSignature, NoteError> {
    let bad = || NoteError::Malformed(format!("bad signature line {line:?}"));
    let rest = line.strip_prefix(SIGNATURE_PREFIX).ok_or_else(bad)?;
    let (name, b64) = rest.split_once(' ').ok_or_else(bad)?;
    if !crate::keys::valid_key_name(name) || b64.contains(' ') {
        return Err(bad());
    }
    let raw = BASE64.decode(b64).map_err(|_| bad())?;
    if raw.len() < 5 {
        return Err(bad());
    }
    Ok(NoteSignature {
        name: name.to_owned(),
        key_hash: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
        signature: raw[4..].to_vec(),
    })
}

/// A note whose signatures were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNote {
    /// The signed text.
    pub text: String,
    /// Names of the known keys whose valid signatures it carries.
    pub signed_by: Vec<String>,
}

impl Note {
    /// Checks the signatures against `keys`: at least one must be a valid
    /// signature by a listed key, and none by a listed key may be invalid;
    /// signatures by unlisted keys are ignored.
    pub fn verify(&self, keys: &[VerifierKey]) -> Result<VerifiedNote, NoteError> {
        let mut signed_by = Vec::new();
        for sig in &self.signatures {
            let known = keys
                .iter()
                .find(|k| k.name() == sig.name && k.key_hash() == sig.key_hash);
            let Some(key) = known else { continue };
            if !key.verify(self.text.as_bytes(), &sig.signature) {
                return Err(NoteError::BadSignature(sig.name.clone()));
            }
            if !signed_by.contains(&sig.name) {
                signed_by.push(sig.name.clone());
            }
        }
        if signed_by.is_empty() {
            let names: Vec<&str> = self.signatures.iter().map(|s| s.name.as_str()).collect();
            return Err(NoteError::UnknownSigners(names.join(", ")));
        }
        Ok(VerifiedNote {
            text: self.text.clone(),
            signed_by,
        })
    }
}

/// Parses `note` and checks it against `keys` (see [`Note::verify`]).
pub fn open(note: &str, keys: &[VerifierKey]) -> Result<VerifiedNote, NoteError> {
    parse(note)?.verify(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(name: &str, seed: u8) -> Signer {
        Signer::from_seed(name, [seed; 32]).expect("valid name")
    }

    #[test]
    fn sign_then_open() {
        let a = signer("a.example", 1);
        let note = sign("hello\nworld\n", &a).expect("signs");
        assert!(note.starts_with("hello\nworld\n\n\u{2014} a.example "));
        let v = open(&note, &[a.verifier()]).expect("verifies");
        assert_eq!(v.text, "hello\nworld\n");
        assert_eq!(v.signed_by, vec!["a.example".to_owned()]);
    }

    #[test]
    fn rotation_unknown_and_bad_signatures() {
        let old = signer("ledger", 1);
        let new = signer("ledger", 2);
        let other = signer("other", 3);
        let note = sign("text\n", &new).expect("signs");
        // Any listed key may sign.
        assert!(open(&note, &[old.verifier(), new.verifier()]).is_ok());
        // Only unknown signers: refused.
        assert!(matches!(
            open(&note, &[old.verifier(), other.verifier()]),
            Err(NoteError::UnknownSigners(_))
        ));
        // A second, unknown signature is ignored.
        let extra = sign("text\n", &other).expect("signs");
        let other_line = extra.rsplit_once("\n\n").expect("split").1;
        let cosigned = format!("{note}{other_line}");
        assert!(open(&cosigned, &[new.verifier()]).is_ok());
        // Changed text: the known key's signature fails.
        let forged = note.replacen("text", "txet", 1);
        assert_eq!(
            open(&forged, &[new.verifier()]),
            Err(NoteError::BadSignature("ledger".into()))
        );
    }

    #[test]
    fn malformed_notes() {
        let a = signer("a", 1);
        let note = sign("x\n", &a).expect("signs");
        for bad in [
            "x\n",
            "x\n\n",
            note.trim_end(),
            &note.replace('\u{2014}', "-"),
            &note.replacen(" ", "  ", 1),
            &format!("{note}\n"),
            &note.replace("x\n", "x\r\n"),
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(sign("no newline", &a).is_err());
    }
}
