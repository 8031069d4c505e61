//! Helpers for the NATS tests: a nats-server child process that can be
//! killed and restarted on the same port and store, ledgers of made-up
//! records, and a reader of what a stream holds.
#![allow(dead_code)]

use async_nats::jetstream;
use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokenmill_metering::{
    verified_checkpoints, CloseReport, Ledger, LedgerConfig, LedgerReader, RecordBody, Signer,
    VerifierKey,
};
use tokenmill_nats::{StreamLayout, HEADER_SEQ};
use tokenmill_protocol::{FinishReason, KeyId, RequestId, TenantId, TokenCounts, UsageEvent};

/// The NATS server that runs on this machine and in CI.
pub const SYSTEM_URL: &str = "nats://127.0.0.1:4222";
pub const ORIGIN: &str = "tokenmill.test/nats";

/// Runs `f` on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A stream name no other test or run uses.
pub fn unique_stream(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("tmtest_{test}_{}_{nanos}", std::process::id())
}

fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let system = Path::new("/usr/sbin/nats-server");
    if system.exists() {
        return system.to_owned();
    }
    PathBuf::from("nats-server")
}

/// A nats-server of our own, with JetStream, on a free loopback port.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = NatsServer {
            port,
            store: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and store directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(nats_server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (set NATS_SERVER_BIN if it is elsewhere)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill");
            child.wait().expect("reaped");
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes a stream of the system server when the test ends, however it
/// ends.
pub struct StreamGuard {
    pub url: String,
    pub stream: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        // A thread of its own: this may run while a runtime is unwinding.
        let _ = std::thread::spawn(move || {
            block_on(async {
                if let Ok(client) = async_nats::connect(url.as_str()).await {
                    let _ = jetstream::new(client).delete_stream(&stream).await;
                }
            })
        })
        .join();
    }
}

pub fn signer() -> Signer {
    Signer::from_seed("nats-test", [7; 32]).expect("valid key name")
}

pub fn keys() -> Vec<VerifierKey> {
    vec![signer().verifier()]
}

pub fn body(i: u64) -> RecordBody {
    let at = UNIX_EPOCH + Duration::new(1_700_000_000 + i, (i * 7919 % 1_000_000_000) as u32);
    RecordBody::Usage(UsageEvent {
        request_id: RequestId(format!("chatcmpl-nats-{i:08}")),
        tenant: TenantId(format!("tenant-{}", i % 4)),
        key_id: KeyId(format!("key-{}", i % 3)),
        model: "SmolLM2-135M-Instruct".into(),
        tokens: TokenCounts {
            prompt_tokens: 20 + i % 100,
            cached_prompt_tokens: i % 16,
            completion_tokens: 1 + i % 300,
        },
        finish_reason: if i % 9 == 0 {
            FinishReason::Length
        } else {
            FinishReason::Stop
        },
        device_seconds: 0.001 * (i % 500) as f64,
        arrived_at: at,
        finished_at: at + Duration::from_millis(300),
    })
}

/// A ledger config: small segments, so exports cross many; a checkpoint
/// every `every` records and every 50 ms.
pub fn config(dir: &Path, every: u64) -> LedgerConfig {
    LedgerConfig {
        segment_max_bytes: 64 << 10,
        checkpoint_every_records: every,
        checkpoint_interval: Duration::from_millis(50),
        ..LedgerConfig::new(dir, ORIGIN)
    }
}

pub fn open_ledger(dir: &Path, every: u64) -> Ledger {
    Ledger::open(config(dir, every), signer())
        .expect("ledger opens")
        .0
}

/// Appends records `from..to` and waits until all are durable.
pub fn append(ledger: &Ledger, from: u64, to: u64) {
    let (tx, rx) = mpsc::channel();
    for i in from..to {
        let tx = tx.clone();
        ledger.append(
            &body(i),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
    }
    drop(tx);
    for r in rx {
        r.expect("record durable");
    }
}

/// A closed ledger of `n` records.
pub fn write_ledger(dir: &Path, n: u64, every: u64) -> CloseReport {
    let ledger = open_ledger(dir, every);
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        append(&ledger, i, end);
        i = end;
    }
    ledger.close().expect("ledger closes")
}

/// The canonical bytes of every record of a ledger directory.
pub fn records_of(dir: &Path) -> Vec<Vec<u8>> {
    LedgerReader::open(dir, 0)
        .expect("reader")
        .map(|r| r.expect("record").bytes)
        .collect()
}

/// The signed notes of a ledger directory.
pub fn notes_of(dir: &Path) -> Vec<String> {
    verified_checkpoints(dir, &keys())
        .expect("checkpoints verify")
        .into_iter()
        .map(|(_, c)| c.note)
        .collect()
}

/// One message as the stream stores it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub subject: String,
    pub msg_id: String,
    pub seq: Option<u64>,
    pub payload: Vec<u8>,
}

/// Every message of `stream`, in stream order.
pub fn stream_messages(url: &str, stream: &str) -> Vec<Stored> {
    block_on(async {
        let client = async_nats::connect(url).await.expect("connects");
        let js = jetstream::new(client);
        let s = js.get_stream(stream).await.expect("stream exists");
        let state = s.cached_info().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence.max(1)..=state.last_sequence {
            let m = s.get_raw_message(seq).await.expect("message");
            let text = |v: Option<&async_nats::HeaderValue>| {
                v.map(|v| v.as_str().to_owned()).unwrap_or_default()
            };
            out.push(Stored {
                subject: m.subject.to_string(),
                // The standard name: a &str name would not match it.
                msg_id: text(m.headers.get(async_nats::header::NATS_MESSAGE_ID)),
                seq: text(m.headers.get(HEADER_SEQ)).parse().ok(),
                payload: m.payload.to_vec(),
            });
        }
        out
    })
}

/// Messages in the stream (0 if it does not exist yet).
pub fn stream_len(url: &str, stream: &str) -> u64 {
    block_on(async {
        let Ok(client) = async_nats::connect(url).await else {
            return 0;
        };
        match jetstream::new(client).get_stream(stream).await {
            Ok(s) => s.cached_info().state.messages,
            Err(_) => 0,
        }
    })
}

/// Checks that `stream` holds exactly the records and notes of the ledger
/// in `dir`, each once, with the message ids of the layout.
pub fn assert_stream_holds_ledger_once(url: &str, stream: &str, dir: &Path) {
    let layout = StreamLayout::new(stream).expect("name");
    let records = records_of(dir);
    let notes = notes_of(dir);
    let messages = stream_messages(url, stream);
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    let mut notes_seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut cosigned_seen: BTreeMap<String, usize> = BTreeMap::new();
    let cosigned = tokenmill_metering::witnessed::CosignatureLog::open(dir)
        .and_then(|log| log.notes())
        .expect("cosignatures read");
    for m in &messages {
        if m.subject == layout.record_subject() {
            let seq = m.seq.expect("records carry their sequence number");
            *by_seq.entry(seq).or_default() += 1;
            let original = records.get(seq as usize).expect("a record of the ledger");
            assert_eq!(&m.payload, original, "record {seq} differs");
            let hash = tokenmill_metering::record::record_hash(original);
            assert_eq!(m.msg_id, StreamLayout::record_msg_id(&hash));
        } else if m.subject == layout.cosigned_subject() {
            let text = String::from_utf8(m.payload.clone()).expect("utf-8");
            *cosigned_seen.entry(text).or_default() += 1;
        } else {
            assert_eq!(m.subject, layout.checkpoint_subject());
            let text = String::from_utf8(m.payload.clone()).expect("utf-8");
            *notes_seen.entry(text).or_default() += 1;
        }
    }
    let twice: Vec<_> = by_seq.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "records in the stream more than once: {twice:?}"
    );
    let missing: Vec<_> = (0..records.len() as u64)
        .filter(|s| !by_seq.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "records missing from the stream: {missing:?}"
    );
    assert_eq!(by_seq.len(), records.len());
    for n in &notes {
        assert_eq!(
            notes_seen.get(n),
            Some(&1),
            "note not in the stream once:\n{n}"
        );
    }
    assert_eq!(
        notes_seen.len(),
        notes.len(),
        "notes the ledger does not have"
    );
    for n in &cosigned {
        assert_eq!(
            cosigned_seen.get(n),
            Some(&1),
            "cosigned note not in the stream once:\n{n}"
        );
    }
    assert_eq!(cosigned_seen.len(), cosigned.len());
    assert_eq!(messages.len(), records.len() + notes.len() + cosigned.len());
}

/// Waits until `done` holds, failing the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
