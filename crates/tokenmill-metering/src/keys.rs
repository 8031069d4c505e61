//! Ed25519 keys in the C2SP signed-note text formats, and their files.
//!
//! The public key is published as a verifier key, `<name>+<hash>+<base64>`,
//! the form other signed-note tools read, so a hardware backer can check our
//! checkpoints without our code. The private key file uses the matching
//! signer form, `PRIVATE+KEY+<name>+<hash>+<base64>`. A private key that
//! others can read is refused: a ledger whose key leaked proves nothing.

use crate::hash::Hash;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::TryRngCore as _;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

/// The signed-note algorithm byte of Ed25519.
pub const ALG_ED25519: u8 = 0x01;

/// File name of the private key that [`generate_key_files`] writes.
pub const PRIVATE_KEY_FILE: &str = "ledger.key";
/// File name of the public (verifier) key that [`generate_key_files`] writes.
pub const PUBLIC_KEY_FILE: &str = "ledger.pub";

const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";
/// Key files are a line of text; anything much larger is not a key.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The private key file can be read or written by group or others.
    #[error(
        "{path}: private key file has mode {mode:o}; it must not be readable or writable by \
         group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file already exists where a new key was to be written.
    #[error("{0}: already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    /// The key name is empty or has a space or '+'.
    #[error("invalid key name {0:?}: it must be non-empty, without spaces or '+'")]
    BadName(String),
    /// The key text is not in the expected format.
    #[error("malformed key: {0}")]
    Format(String),
    /// The operating system gave no random bytes.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// The 32-bit key hash of signed notes: the first four bytes, big-endian, of
/// SHA-256(name || "\n" || 0x01 || public key). It lets a verifier pick the
/// key a signature line claims without trying them all.
pub fn key_hash(name: &str, public: &[u8; 32]) -> u32 {
    let h = Hash::of_parts(&[name.as_bytes(), b"\n", &[ALG_ED25519], public]);
    u32::from_be_bytes([h.0[0], h.0[1], h.0[2], h.0[3]])
}

/// Whether `name` may name a key: non-empty, no Unicode white space, no '+'
/// (the separator of the key text formats).
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// A private signing key and its name.
#[derive(Clone)]
pub struct Signer {
    name: String,
    key: SigningKey,
    hash: u32,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Signer({}+{:08x})", self.name, self.hash)
    }
}

impl Signer {
    /// The signer of `name` whose Ed25519 secret key is `seed`.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Signer, KeyError> {
        if !valid_key_name(name) {
            return Err(KeyError::BadName(name.to_owned()));
        }
        let key = SigningKey::from_bytes(&seed);
        let hash = key_hash(name, key.verifying_key().as_bytes());
        Ok(Signer {
            name: name.to_owned(),
            key,
            hash,
        })
    }

    /// A new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Signer, KeyError> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Signer::from_seed(name, seed)
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key hash that its signature lines carry.
    pub fn key_hash(&self) -> u32 {
        self.hash
    }

    /// The public half, for verifiers.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            hash: self.hash,
            key: self.key.verifying_key(),
        }
    }

    /// The Ed25519 key itself, for the cosigner that shares it.
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The private key text, `PRIVATE+KEY+<name>+<hash>+<base64(0x01 ||
    /// seed)>`, as written to the private key file.
    pub fn to_private_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(&self.key.to_bytes());
        format!(
            "{PRIVATE_PREFIX}{}+{:08x}+{}",
            self.name,
            self.hash,
            BASE64.encode(&raw)
        )
    }

    /// Parses the private key text; the key hash in it must match the key.
    pub fn from_private_text(text: &str) -> Result<Signer, KeyError> {
        let rest = text
            .trim_end_matches('\n')
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or_else(|| KeyError::Format("a private key starts with PRIVATE+KEY+".into()))?;
        let (name, hash, raw) = split_key_text(rest)?;
        let seed: [u8; 32] = match raw.split_first() {
            Some((&ALG_ED25519, seed)) => seed
                .try_into()
                .map_err(|_| KeyError::Format("an Ed25519 seed is 32 bytes".into()))?,
            _ => return Err(KeyError::Format("not an Ed25519 key".into())),
        };
        let signer = Signer::from_seed(name, seed)?;
        if signer.hash != hash {
            return Err(KeyError::Format("key hash does not match the key".into()));
        }
        Ok(signer)
    }
}

/// A public key that checks signed notes: name, key hash and Ed25519 key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    hash: u32,
    key: VerifyingKey,
}

impl VerifierKey {
    /// Parses `<name>+<8 hex key hash>+<base64(0x01 || public key)>`; the
    /// hash must match the name and key.
    pub fn parse(text: &str) -> Result<VerifierKey, KeyError> {
        let (name, hash, raw) = split_key_text(text.trim_end_matches('\n'))?;
        let public: [u8; 32] = match raw.split_first() {
            Some((&ALG_ED25519, public)) => public
                .try_into()
                .map_err(|_| KeyError::Format("an Ed25519 public key is 32 bytes".into()))?,
            _ => return Err(KeyError::Format("not an Ed25519 key".into())),
        };
        if !valid_key_name(name) {
            return Err(KeyError::BadName(name.to_owned()));
        }
        if key_hash(name, &public) != hash {
            return Err(KeyError::Format("key hash does not match the key".into()));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| KeyError::Format("not a valid Ed25519 public key".into()))?;
        Ok(VerifierKey {
            name: name.to_owned(),
            hash,
            key,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key hash its signature lines carry.
    pub fn key_hash(&self) -> u32 {
        self.hash
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `signature` is this key's valid signature of `message`
    /// (strict verification: no malleable or small-order encodings).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        self.key
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.hash, BASE64.encode(&raw))
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

/// Splits `<name>+<hash>+<base64>` into its parts.
fn split_key_text(text: &str) -> Result<(&str, u32, Vec<u8>), KeyError> {
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(hash), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(KeyError::Format("expected <name>+<hash>+<key>".into()));
    };
    if hash.len() != 8 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyError::Format("key hash is 8 hex digits".into()));
    }
    let hash = u32::from_str_radix(hash, 16)
        .map_err(|_| KeyError::Format("key hash is 8 hex digits".into()))?;
    let raw = BASE64
        .decode(b64)
        .map_err(|_| KeyError::Format("key is not base64".into()))?;
    Ok((name, hash, raw))
}

/// Where [`generate_key_files`] put a new key.
#[derive(Debug)]
pub struct KeyFiles {
    /// The private key file (mode 0600).
    pub private: PathBuf,
    /// The public key file, one verifier-key line.
    pub public: PathBuf,
    /// The public key, to print.
    pub verifier: VerifierKey,
}

/// Generates a key named `name` and writes `dir/ledger.key` (mode 0600) and
/// `dir/ledger.pub`. Each file appears whole or not at all (written to a
/// temporary file, synced, then linked into place), and an existing key is
/// never overwritten.
pub fn generate_key_files(dir: &Path, name: &str) -> Result<KeyFiles, KeyError> {
    let signer = Signer::generate(name)?;
    let verifier = signer.verifier();
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let private = dir.join(PRIVATE_KEY_FILE);
    let public = dir.join(PUBLIC_KEY_FILE);
    for path in [&private, &public] {
        if path.exists() {
            return Err(KeyError::Exists(path.clone()));
        }
    }
    write_new_file(
        &private,
        format!("{}\n", signer.to_private_text()).as_bytes(),
        0o600,
    )?;
    write_new_file(&public, format!("{verifier}\n").as_bytes(), 0o644)?;
    Ok(KeyFiles {
        private,
        public,
        verifier,
    })
}

/// Writes `bytes` to a new file at `path` with permission bits `mode`,
/// atomically, refusing to replace an existing file.
fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let dir = crate::fsutil::parent_dir(path);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        set_create_mode(&mut options, mode);
        let mut file = options.open(&tmp).map_err(|e| io_err(&tmp, e))?;
        file.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
        file.sync_all().map_err(|e| io_err(&tmp, e))?;
        // A link, unlike a rename, fails if the target exists.
        fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists(path.to_owned())
            } else {
                io_err(path, e)
            }
        })
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    crate::fsutil::sync_dir(dir).map_err(|e| io_err(dir, e))
}

#[cfg(unix)]
fn set_create_mode(options: &mut OpenOptions, mode: u32) {
    use std::os::unix::fs::OpenOptionsExt as _;
    options.mode(mode);
}

#[cfg(not(unix))]
fn set_create_mode(_: &mut OpenOptions, _: u32) {}

/// Reads a private key file, refusing one that group or others may read or
/// write.
pub fn load_signer(path: &Path) -> Result<Signer, KeyError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    check_private_mode(path, &meta)?;
    let text = read_small(file, path)?;
    Signer::from_private_text(text.trim())
}

#[cfg(unix)]
fn check_private_mode(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_: &Path, _: &fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

/// Reads a public key file: one verifier-key line (blank lines and lines
/// starting with '#' are skipped).
pub fn load_verifier(path: &Path) -> Result<VerifierKey, KeyError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let text = read_small(file, path)?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    match (lines.next(), lines.next()) {
        (Some(line), None) => VerifierKey::parse(line),
        _ => Err(KeyError::Format(format!(
            "{}: expected exactly one verifier key line",
            path.display()
        ))),
    }
}

fn read_small(file: File, path: &Path) -> Result<String, KeyError> {
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| io_err(path, e))?;
    Ok(text)
}

fn io_err(path: &Path, source: std::io::Error) -> KeyError {
    KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip() {
        let signer = Signer::from_seed("example.com/ledger", [7; 32]).expect("valid");
        let private = signer.to_private_text();
        let back = Signer::from_private_text(&private).expect("parses");
        assert_eq!(back.verifier(), signer.verifier());
        let public = signer.verifier().to_string();
        assert_eq!(
            VerifierKey::parse(&public).expect("parses"),
            signer.verifier()
        );
        let wrong_hash = format!(
            "{}+{:08x}+{}",
            signer.name(),
            signer.key_hash() ^ 1,
            public.rsplit('+').next().expect("three parts")
        );
        assert!(VerifierKey::parse(&wrong_hash).is_err());
        assert!(Signer::from_seed("has space", [1; 32]).is_err());
        assert!(Signer::from_seed("a+b", [1; 32]).is_err());
        assert!(Signer::from_seed("", [1; 32]).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private_and_checked() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate_key_files(dir.path(), "test-key").expect("generates");
        let mode = fs::metadata(&files.private)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let signer = load_signer(&files.private).expect("loads");
        assert_eq!(signer.verifier(), files.verifier);
        assert_eq!(load_verifier(&files.public).expect("loads"), files.verifier);
        assert!(matches!(
            generate_key_files(dir.path(), "test-key"),
            Err(KeyError::Exists(_))
        ));

        for bad in [0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&files.private, fs::Permissions::from_mode(bad)).expect("chmod");
            let err = load_signer(&files.private).expect_err("refused");
            assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
            assert!(err.to_string().contains("chmod 600"));
        }
        fs::set_permissions(&files.private, fs::Permissions::from_mode(0o400)).expect("chmod");
        assert!(load_signer(&files.private).is_ok());
    }
}
