//! Witness cosignatures of checkpoints, in the C2SP tlog-cosignature format
//! (Ed25519, `cosignature/v1`).
//!
//! The ledger's own signature says "the cloud wrote this". A cosignature
//! says "a witness, which the cloud does not run, saw this checkpoint and
//! checked that it extends every earlier one it cosigned for the same
//! ledger". A cloud holding two histories under one key can get at most one
//! of them cosigned by an honest witness, so a statement that rests on a
//! cosigned checkpoint rests on the one history the backer saw.
//!
//! A cosignature is a signed-note signature line:
//!
//! ```text
//! — <witness name> base64(key id (4) || timestamp (8, big-endian) || Ed25519 signature (64))
//! ```
//!
//! over the message `"cosignature/v1\ntime <timestamp>\n" || checkpoint
//! text`. The key id is the first four bytes of SHA-256(name || "\n" ||
//! 0x04 || public key): the 0x04 keeps a cosigner's id apart from a log key's
//! (0x01), so one cannot be taken for the other. docs/ledger-format.md has
//! test vectors.

use crate::hash::Hash;
use crate::keys::{valid_key_name, KeyError, Signer};
use crate::note::{NoteSignature, SIGNATURE_PREFIX};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// The signature type byte of Ed25519 `cosignature/v1` keys.
pub const ALG_COSIGNATURE_V1: u8 = 0x04;

/// Why a cosignature could not be made or does not check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CosignatureError {
    /// The signature line is not `key id || timestamp || signature`.
    #[error("cosignature by {0} is not 76 bytes (key id, timestamp, signature)")]
    Malformed(String),
    /// The timestamp is beyond 2^63 - 1, which the format forbids.
    #[error("cosignature by {0} has a timestamp beyond 2^63 - 1")]
    Timestamp(String),
    /// The witness's key signed, but not this checkpoint.
    #[error("cosignature by {0} does not verify over this checkpoint")]
    BadSignature(String),
}

/// The 32-bit key id of a cosigner: the first four bytes, big-endian, of
/// SHA-256(name || "\n" || 0x04 || public key).
pub fn cosigner_key_id(name: &str, public: &[u8; 32]) -> u32 {
    let h = Hash::of_parts(&[name.as_bytes(), b"\n", &[ALG_COSIGNATURE_V1], public]);
    u32::from_be_bytes([h.0[0], h.0[1], h.0[2], h.0[3]])
}

/// The bytes a `cosignature/v1` signs: a header line, the time line, then the
/// checkpoint text (ending in its newline, without signature lines).
pub fn signed_message(checkpoint_text: &str, timestamp: u64) -> Vec<u8> {
    format!("cosignature/v1\ntime {timestamp}\n{checkpoint_text}").into_bytes()
}

/// A witness's signing key.
#[derive(Clone)]
pub struct Cosigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Cosigner({}+{:08x})", self.name, self.id)
    }
}

impl Cosigner {
    /// The cosigner with `signer`'s name and Ed25519 key. A witness keeps
    /// its key in the same private key file format as a ledger; the key id
    /// of its cosignatures is computed with the cosignature type byte.
    pub fn from_signer(signer: &Signer) -> Cosigner {
        let key = signer.signing_key().clone();
        let id = cosigner_key_id(signer.name(), key.verifying_key().as_bytes());
        Cosigner {
            name: signer.name().to_owned(),
            key,
            id,
        }
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key that checks this witness's cosignatures.
    pub fn public(&self) -> CosignerKey {
        CosignerKey {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The cosignature line (ending in a newline) of `checkpoint_text` at
    /// `timestamp` (Unix seconds; at most 2^63 - 1).
    pub fn cosign(&self, checkpoint_text: &str, timestamp: u64) -> String {
        let timestamp = timestamp.min(i64::MAX as u64);
        let signature = self.key.sign(&signed_message(checkpoint_text, timestamp));
        let mut raw = Vec::with_capacity(76);
        raw.extend_from_slice(&self.id.to_be_bytes());
        raw.extend_from_slice(&timestamp.to_be_bytes());
        raw.extend_from_slice(&signature.to_bytes());
        format!("{SIGNATURE_PREFIX}{} {}\n", self.name, BASE64.encode(&raw))
    }
}

/// A witness's public key: `<name>+<8 hex key id>+<base64(0x04 || public
/// key)>`, the signed-note verifier key format with the cosignature type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignerKey {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl CosignerKey {
    /// Parses the key text; the id must match the name and key.
    pub fn parse(text: &str) -> Result<CosignerKey, KeyError> {
        let text = text.trim_end_matches('\n');
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(raw)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Format(
                "a witness key is NAME+KEYID+BASE64".into(),
            ));
        };
        if !valid_key_name(name) {
            return Err(KeyError::BadName(name.to_owned()));
        }
        let id = (id.len() == 8)
            .then(|| u32::from_str_radix(id, 16).ok())
            .flatten()
            .ok_or_else(|| KeyError::Format("the key id is 8 hex digits".into()))?;
        let raw = BASE64
            .decode(raw)
            .map_err(|_| KeyError::Format("the key is not base64".into()))?;
        let public: [u8; 32] = match raw.split_first() {
            Some((&ALG_COSIGNATURE_V1, public)) => public
                .try_into()
                .map_err(|_| KeyError::Format("an Ed25519 public key is 32 bytes".into()))?,
            _ => {
                return Err(KeyError::Format(
                    "not a cosignature/v1 key (type byte 0x04)".into(),
                ))
            }
        };
        if cosigner_key_id(name, &public) != id {
            return Err(KeyError::Format("key id does not match the key".into()));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| KeyError::Format("not a valid Ed25519 public key".into()))?;
        Ok(CosignerKey {
            name: name.to_owned(),
            id,
            key,
        })
    }

    /// The key text.
    pub fn to_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_COSIGNATURE_V1);
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, BASE64.encode(&raw))
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id its cosignature lines carry.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// Whether a signature line claims to be by this key (name and id).
    pub fn claims(&self, line: &NoteSignature) -> bool {
        line.name == self.name && line.key_hash == self.id
    }

    /// Checks a cosignature line of this key over `checkpoint_text`;
    /// returns its timestamp.
    pub fn verify(
        &self,
        checkpoint_text: &str,
        line: &NoteSignature,
    ) -> Result<u64, CosignatureError> {
        let malformed = || CosignatureError::Malformed(self.name.clone());
        let (stamp, signature) = line
            .signature
            .split_first_chunk::<8>()
            .ok_or_else(malformed)?;
        let signature = <[u8; 64]>::try_from(signature).map_err(|_| malformed())?;
        let timestamp = u64::from_be_bytes(*stamp);
        if timestamp > i64::MAX as u64 {
            return Err(CosignatureError::Timestamp(self.name.clone()));
        }
        self.key
            .verify_strict(
                &signed_message(checkpoint_text, timestamp),
                &Signature::from_bytes(&signature),
            )
            .map_err(|_| CosignatureError::BadSignature(self.name.clone()))?;
        Ok(timestamp)
    }
}

/// A valid cosignature found on a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cosigned {
    /// The witness's name.
    pub witness: String,
    /// When it cosigned (Unix seconds).
    pub timestamp: u64,
}

/// The valid cosignatures among `lines` by the witnesses in `keys` over
/// `checkpoint_text`, one per witness. A line that claims a known witness's
/// key but does not verify is an error, not skipped: it is evidence of
/// tampering, and a verifier must say so. Lines of unknown keys (the log's
/// own signature among them) are ignored.
pub fn cosignatures(
    checkpoint_text: &str,
    lines: &[NoteSignature],
    keys: &[CosignerKey],
) -> Result<Vec<Cosigned>, CosignatureError> {
    let mut found: Vec<Cosigned> = Vec::new();
    for line in lines {
        let Some(key) = keys.iter().find(|k| k.claims(line)) else {
            continue;
        };
        let timestamp = key.verify(checkpoint_text, line)?;
        if !found.iter().any(|c| c.witness == key.name) {
            found.push(Cosigned {
                witness: key.name.clone(),
                timestamp,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::note;

    fn witness() -> Cosigner {
        Cosigner::from_signer(&Signer::from_seed("witness.example/w1", [7; 32]).unwrap())
    }

    fn checkpoint_text() -> String {
        let mut cp = Checkpoint::new("tokenmill.example/ledger", 5, Hash::of_parts(&[b"x"]));
        cp.time_ms = Some(1_700_000_000_000);
        cp.to_text()
    }

    #[test]
    fn a_cosignature_verifies_with_the_witness_key_and_only_over_its_checkpoint() {
        let w = witness();
        let text = checkpoint_text();
        let line = w.cosign(&text, 1_700_000_123);
        let log = Signer::from_seed("tokenmill.example/ledger", [1; 32]).unwrap();
        let signed = format!("{}{line}", note::sign(&text, &log).unwrap());
        let parsed = note::parse(&signed).unwrap();
        let key = CosignerKey::parse(&w.public().to_text()).unwrap();
        let found =
            cosignatures(&parsed.text, &parsed.signatures, std::slice::from_ref(&key)).unwrap();
        assert_eq!(
            found,
            vec![Cosigned {
                witness: "witness.example/w1".into(),
                timestamp: 1_700_000_123
            }]
        );
        // The same line over another checkpoint is a bad signature.
        let other = text.replace("\n5\n", "\n6\n");
        let err = cosignatures(&other, &parsed.signatures, &[key]).unwrap_err();
        assert!(matches!(err, CosignatureError::BadSignature(_)), "{err}");
    }

    #[test]
    fn the_key_id_uses_the_cosignature_type_byte() {
        let signer = Signer::from_seed("witness.example/w1", [7; 32]).unwrap();
        let w = Cosigner::from_signer(&signer);
        assert_ne!(w.public().key_id(), signer.key_hash());
        // A log key's text is not a witness key.
        let log_key = crate::keys::VerifierKey::parse(&signer.verifier().to_string());
        assert!(log_key.is_ok());
        assert!(CosignerKey::parse(&signer.verifier().to_string()).is_err());
    }

    #[test]
    fn a_log_signature_line_is_not_taken_for_a_cosignature() {
        // Same name and key as the witness, but signed as a log (0x01): its
        // key hash differs, so it is ignored rather than counted.
        let signer = Signer::from_seed("witness.example/w1", [7; 32]).unwrap();
        let text = checkpoint_text();
        let parsed = note::parse(&note::sign(&text, &signer).unwrap()).unwrap();
        let found = cosignatures(&text, &parsed.signatures, &[witness().public()]).unwrap();
        assert!(found.is_empty());
    }
}
