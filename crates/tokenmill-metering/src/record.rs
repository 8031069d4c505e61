//! Ledger records and their canonical encoding (format version 1).
//!
//! A record is what the ledger stores and hashes: a header (version, sequence
//! number, hash of the previous record) and a body (one finished request's
//! usage, or one interval of a device's capacity). The encoding has one byte
//! string per record value, so a third party that decodes and re-encodes gets
//! the same bytes and the same hash; docs/ledger-format.md gives the layout.
//!
//! The body is encoded apart from the header ([`EncodedBody`]) so that the
//! caller's thread does the encoding and validation, and the writer thread,
//! which alone knows the sequence number and previous hash, only prepends 41
//! bytes.

use crate::codec::{DecodeError, EncodeError, Reader, Writer};
use crate::hash::Hash;
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantCapacity, TenantId, TokenCounts,
    UsageEvent,
};

/// The record format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// Largest encoded record accepted, header included. Far above any real
/// record; it bounds what a reader allocates for a corrupt length field.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Bytes of the record header: version (1), sequence number (8), previous
/// hash (32).
pub const HEADER_BYTES: usize = 1 + 8 + 32;

/// The prefix of the record hash: it keeps record hashes apart from Merkle
/// leaf hashes (prefix 0x00) and node hashes (prefix 0x01) of the same bytes.
pub const RECORD_HASH_DOMAIN: &[u8] = b"tokenmill/ledger/record\x00";

const TAG_USAGE: u8 = 1;
const TAG_CAPACITY: u8 = 2;

/// What a record says.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordBody {
    /// The usage of one finished request.
    Usage(UsageEvent),
    /// One interval of one device's capacity.
    Capacity(CapacityRecord),
}

impl RecordBody {
    /// "usage" or "capacity", as in exports.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::Usage(_) => "usage",
            RecordBody::Capacity(_) => "capacity",
        }
    }

    /// Validates and encodes the body (tag and fields, no header).
    pub fn encode(&self) -> Result<EncodedBody, EncodeError> {
        let mut out = Vec::with_capacity(160);
        let mut w = Writer::new(&mut out);
        match self {
            RecordBody::Usage(u) => {
                w.u8(TAG_USAGE);
                encode_usage(&mut w, u)?;
            }
            RecordBody::Capacity(c) => {
                w.u8(TAG_CAPACITY);
                encode_capacity(&mut w, c)?;
            }
        }
        if out.len() + HEADER_BYTES > MAX_RECORD_BYTES {
            return Err(EncodeError::TooLong("record"));
        }
        Ok(EncodedBody(out))
    }
}

/// A validated, canonically encoded record body, ready to be chained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBody(Vec<u8>);

impl EncodedBody {
    /// The body's bytes (tag first).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One ledger record: its place in the chain and what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Position in the ledger, from 0, without gaps.
    pub seq: u64,
    /// Hash of the record before ([`Hash::ZERO`] for record 0).
    pub prev_hash: Hash,
    /// The usage or capacity the record holds.
    pub body: RecordBody,
}

impl Record {
    /// The canonical bytes of the record.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let body = self.body.encode()?;
        let mut out = Vec::with_capacity(HEADER_BYTES + body.0.len());
        encode_record(self.seq, &self.prev_hash, &body, &mut out);
        Ok(out)
    }

    /// Decodes canonical record bytes; anything the encoder would not have
    /// produced is an error.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let seq = r.u64()?;
        let prev_hash = Hash(r.hash()?);
        let at = r.pos();
        let body = match r.u8()? {
            TAG_USAGE => RecordBody::Usage(decode_usage(&mut r)?),
            TAG_CAPACITY => RecordBody::Capacity(decode_capacity(&mut r)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "record body",
                    tag,
                    offset: at,
                })
            }
        };
        r.finish()?;
        Ok(Record {
            seq,
            prev_hash,
            body,
        })
    }
}

/// Appends the record made of `seq`, `prev_hash` and `body` to `out`.
pub fn encode_record(seq: u64, prev_hash: &Hash, body: &EncodedBody, out: &mut Vec<u8>) {
    let mut w = Writer::new(out);
    w.u8(FORMAT_VERSION);
    w.u64(seq);
    w.bytes(&prev_hash.0);
    w.bytes(&body.0);
}

/// The hash that chains records: SHA-256 of [`RECORD_HASH_DOMAIN`] followed
/// by the record's canonical bytes. The next record carries it as
/// `prev_hash`; it is also the record's id in exports and message ids.
pub fn record_hash(record_bytes: &[u8]) -> Hash {
    Hash::of_parts(&[RECORD_HASH_DOMAIN, record_bytes])
}

/// Reads the sequence number of record bytes without decoding the body, so
/// that a damaged body can still be placed.
pub fn peek_seq(record_bytes: &[u8]) -> Option<u64> {
    let raw = record_bytes.get(1..9)?;
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

fn encode_usage(w: &mut Writer<'_>, u: &UsageEvent) -> Result<(), EncodeError> {
    w.str("request_id", &u.request_id.0)?;
    w.str("tenant", &u.tenant.0)?;
    w.str("key_id", &u.key_id.0)?;
    w.str("model", &u.model)?;
    w.u64(u.tokens.prompt_tokens);
    w.u64(u.tokens.cached_prompt_tokens);
    w.u64(u.tokens.completion_tokens);
    w.u8(finish_tag(u.finish_reason));
    w.f64("device_seconds", u.device_seconds)?;
    w.time("arrived_at", u.arrived_at)?;
    w.time("finished_at", u.finished_at)
}

fn decode_usage(r: &mut Reader<'_>) -> Result<UsageEvent, DecodeError> {
    let request_id = RequestId(r.string()?);
    let tenant = TenantId(r.string()?);
    let key_id = KeyId(r.string()?);
    let model = r.string()?;
    let tokens = TokenCounts {
        prompt_tokens: r.u64()?,
        cached_prompt_tokens: r.u64()?,
        completion_tokens: r.u64()?,
    };
    let at = r.pos();
    let tag = r.u8()?;
    let finish_reason = finish_from_tag(tag).ok_or(DecodeError::UnknownTag {
        what: "finish reason",
        tag,
        offset: at,
    })?;
    Ok(UsageEvent {
        request_id,
        tenant,
        key_id,
        model,
        tokens,
        finish_reason,
        device_seconds: r.f64()?,
        arrived_at: r.time()?,
        finished_at: r.time()?,
    })
}

fn encode_capacity(w: &mut Writer<'_>, c: &CapacityRecord) -> Result<(), EncodeError> {
    w.str("device", &c.device)?;
    w.time("start", c.start)?;
    w.time("end", c.end)?;
    w.f64("wall_seconds", c.wall_seconds)?;
    w.f64("busy_seconds", c.busy_seconds)?;
    w.u64(c.tokens);
    w.len("tenants", c.tenants.len())?;
    for t in &c.tenants {
        w.str("tenants.tenant", &t.tenant.0)?;
        w.f64("tenants.busy_seconds", t.busy_seconds)?;
        w.u64(t.tokens);
    }
    Ok(())
}

fn decode_capacity(r: &mut Reader<'_>) -> Result<CapacityRecord, DecodeError> {
    let device = r.string()?;
    let start = r.time()?;
    let end = r.time()?;
    let wall_seconds = r.f64()?;
    let busy_seconds = r.f64()?;
    let tokens = r.u64()?;
    let n = r.len()?;
    // Each tenant takes at least 20 bytes; a count beyond what is left is a
    // corrupt record, not a reason to allocate.
    let mut tenants = Vec::with_capacity(n.min(MAX_RECORD_BYTES / 20));
    for _ in 0..n {
        tenants.push(TenantCapacity {
            tenant: TenantId(r.string()?),
            busy_seconds: r.f64()?,
            tokens: r.u64()?,
        });
    }
    Ok(CapacityRecord {
        device,
        start,
        end,
        wall_seconds,
        busy_seconds,
        tokens,
        tenants,
    })
}

fn finish_tag(reason: FinishReason) -> u8 {
    match reason {
        FinishReason::Stop => 1,
        FinishReason::Length => 2,
        FinishReason::Cancelled => 3,
        FinishReason::Error => 4,
        FinishReason::Shutdown => 5,
    }
}

fn finish_from_tag(tag: u8) -> Option<FinishReason> {
    match tag {
        1 => Some(FinishReason::Stop),
        2 => Some(FinishReason::Length),
        3 => Some(FinishReason::Cancelled),
        4 => Some(FinishReason::Error),
        5 => Some(FinishReason::Shutdown),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample_capacity, sample_usage};
    use rand::{Rng, SeedableRng};

    fn records(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                let body = if rng.random_bool(0.5) {
                    RecordBody::Usage(sample_usage(rng))
                } else {
                    RecordBody::Capacity(sample_capacity(rng))
                };
                let mut prev = [0u8; 32];
                rng.fill(&mut prev);
                Record {
                    seq: i as u64,
                    prev_hash: Hash(prev),
                    body,
                }
            })
            .collect()
    }

    #[test]
    fn round_trips_and_reencodes_to_the_same_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for record in records(&mut rng, 500) {
            let bytes = record.encode().expect("encodes");
            let back = Record::decode(&bytes).expect("decodes");
            assert_eq!(back, record);
            assert_eq!(back.encode().expect("encodes"), bytes);
            assert_eq!(peek_seq(&bytes), Some(record.seq));
        }
    }

    #[test]
    fn rejects_non_canonical_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let usage = Record {
            seq: 3,
            prev_hash: Hash::ZERO,
            body: RecordBody::Usage(sample_usage(&mut rng)),
        };
        let bytes = usage.encode().expect("encodes");

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Record::decode(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        assert!(matches!(
            Record::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated(_))
        ));

        let mut version = bytes.clone();
        version[0] = 2;
        assert_eq!(
            Record::decode(&version),
            Err(DecodeError::UnknownVersion(2))
        );

        let mut tag = bytes.clone();
        tag[HEADER_BYTES] = 9;
        assert!(matches!(
            Record::decode(&tag),
            Err(DecodeError::UnknownTag { tag: 9, .. })
        ));

        // The request id is the first string: its first byte follows the
        // tag and a 4-byte length.
        let mut utf8 = bytes.clone();
        utf8[HEADER_BYTES + 5] = 0xff;
        assert!(matches!(
            Record::decode(&utf8),
            Err(DecodeError::BadUtf8(_))
        ));

        let mut length = bytes;
        length[HEADER_BYTES + 1] = 0xff;
        assert!(Record::decode(&length).is_err());
    }

    #[test]
    fn refuses_to_encode_nan() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut u = sample_usage(&mut rng);
        u.device_seconds = f64::NAN;
        assert_eq!(
            RecordBody::Usage(u).encode(),
            Err(EncodeError::NonFinite("device_seconds"))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let good = records(&mut rng, 20);
        for record in &good {
            let bytes = record.encode().expect("encodes");
            for _ in 0..200 {
                let mut b = bytes.clone();
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
                // A flipped bit either fails to decode or decodes to a record
                // whose canonical bytes are exactly the flipped ones.
                if let Ok(r) = Record::decode(&b) {
                    assert_eq!(r.encode().expect("encodes"), b);
                }
            }
        }
    }
}
