//! Test ledgers on disk with chosen record and checkpoint times.
//!
//! Settlement decides what arrived when from the signed times of
//! checkpoints, so tests must choose those times. The ledger writer stamps
//! checkpoints with the clock; these helpers instead chain and encode the
//! records themselves, sign each checkpoint (a real Ed25519 signed note,
//! with the time the test chose) and hand both to tokenmill-metering's
//! `Importer`, which writes them with the same store as the writer and
//! verifies the result.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};
use tokenmill_metering::merkle::{self, CompactTree};
use tokenmill_metering::{Checkpoint, Hash, Importer, LedgerConfig, Record, RecordBody, Signer};
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantId, TokenCounts, UsageEvent,
};
use tokenmill_settlement::period;

pub const ORIGIN: &str = "tokenmill.test/settlement";

pub fn signer() -> Signer {
    Signer::from_seed("settlement-test", [42; 32]).expect("valid key name")
}

fn at(text: &str) -> std::time::SystemTime {
    let secs = period::parse_instant(text).expect("test time");
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"))
}

/// Records and checkpoints to write, in order.
#[derive(Default, Clone)]
pub struct LedgerSpec {
    bodies: Vec<RecordBody>,
    /// (tree size, signed at in ms)
    checkpoints: Vec<(u64, u64)>,
}

impl LedgerSpec {
    /// A usage record finished at `finished` (`YYYY-MM-DDTHH:MM:SSZ`).
    pub fn usage(
        &mut self,
        tenant: &str,
        model: &str,
        finished: &str,
        prompt: u64,
        cached: u64,
        completion: u64,
    ) -> &mut Self {
        let n = self.bodies.len();
        let finished_at = at(finished);
        self.bodies.push(RecordBody::Usage(UsageEvent {
            request_id: RequestId(format!("chatcmpl-{n:04}")),
            tenant: TenantId(tenant.into()),
            key_id: KeyId(format!("{tenant}-key")),
            model: model.into(),
            tokens: TokenCounts {
                prompt_tokens: prompt,
                cached_prompt_tokens: cached,
                completion_tokens: completion,
            },
            finish_reason: FinishReason::Stop,
            device_seconds: 0.5,
            arrived_at: finished_at - Duration::from_secs(2),
            finished_at,
        }));
        self
    }

    /// A capacity record of one device from `start` to `end`.
    pub fn capacity(&mut self, start: &str, end: &str, wall: f64, busy: f64) -> &mut Self {
        self.bodies.push(RecordBody::Capacity(CapacityRecord {
            device: "cuda:0".into(),
            start: at(start),
            end: at(end),
            wall_seconds: wall,
            busy_seconds: busy,
            tokens: 0,
            tenants: Vec::new(),
        }));
        self
    }

    /// A checkpoint over every record so far, signed at `time`.
    pub fn checkpoint(&mut self, time: &str) -> &mut Self {
        let ms = u64::try_from(period::parse_instant(time).expect("test time"))
            .expect("after 1970")
            * 1000;
        self.checkpoints.push((self.bodies.len() as u64, ms));
        self
    }

    /// Records so far.
    pub fn len(&self) -> u64 {
        self.bodies.len() as u64
    }

    /// Writes the ledger into `dir` (missing or empty) and verifies it.
    pub fn write(&self, dir: &Path, signer: &Signer) {
        let mut importer =
            Importer::create(LedgerConfig::new(dir, ORIGIN), None).expect("importer");
        let mut tree = CompactTree::new();
        let mut prev = Hash::ZERO;
        let mut notes = self.checkpoints.iter().peekable();
        let mut sign_due = |tree: &CompactTree, importer: &mut Importer| {
            while let Some(&&(size, ms)) = notes.peek() {
                if size != tree.size() {
                    break;
                }
                let cp = Checkpoint {
                    origin: ORIGIN.into(),
                    size,
                    root: tree.root(),
                    time_ms: Some(ms),
                    extensions: Vec::new(),
                };
                importer
                    .push_checkpoint(&cp.sign(signer).expect("signs"))
                    .expect("checkpoint");
                notes.next();
            }
        };
        sign_due(&tree, &mut importer);
        for (seq, body) in self.bodies.iter().enumerate() {
            let record = Record {
                seq: seq as u64,
                prev_hash: prev,
                body: body.clone(),
            };
            let bytes = record.encode().expect("encodes");
            let receipt = importer.push_record(&bytes).expect("record");
            prev = receipt.hash;
            tree.push(merkle::leaf_hash(&bytes));
            sign_due(&tree, &mut importer);
        }
        importer
            .finish(&[signer.verifier()])
            .expect("ledger verifies");
    }
}
