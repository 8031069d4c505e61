//! Tenants and their API keys, kept in a TOML file.
//!
//! Keys are stored only as SHA-256 hashes, so the file can be read, backed up
//! or kept in version control without giving anyone access; a key is shown
//! once, when it is made. A presented key is hashed and looked up by its
//! hash, so checking it reveals nothing about the stored ones through
//! timing.
//!
//! ```toml
//! [[tenant]]
//! name = "acme"
//! weight = 2          # fair share against other tenants (default 1)
//!
//! [[tenant.key]]
//! id = "key_5f0c2a9e41b7"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! created = 1795406400  # unix seconds
//! ```

use rand::distr::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokenmill_protocol::{Caller, KeyId, TenantId};

/// What can be wrong with a tenants file.
#[derive(Debug, Error)]
pub enum TenantsError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The content breaks a rule (duplicate names, a bad hash, ...).
    #[error("{0}")]
    Invalid(String),
}

/// The tenants file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    /// Every tenant.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantEntry>,
}

/// One tenant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    /// The tenant's name, as usage records bill it.
    pub name: String,
    /// Fair-share weight against other tenants, at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The tenant's keys.
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyEntry>,
}

fn default_weight() -> u32 {
    1
}

/// One API key, by its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key's public id (usage records name it; the key itself never).
    pub id: String,
    /// Lowercase hex SHA-256 of the key.
    pub sha256: String,
    /// When the key was made, in unix seconds.
    #[serde(default)]
    pub created: u64,
}

/// A key just made: the secret is shown once and kept nowhere.
#[derive(Debug)]
pub struct NewKey {
    /// The tenant it belongs to.
    pub tenant: String,
    /// Its public id.
    pub id: String,
    /// The key to give the tenant.
    pub secret: String,
}

/// Prefix of every key, so a leaked one is recognisable in logs and scans.
pub const KEY_PREFIX: &str = "sk-tm-";

impl TenantsFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, TenantsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let file: TenantsFile = toml::from_str(&text).map_err(|e| TenantsError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        file.check()?;
        Ok(file)
    }

    /// Reads `path`, or an empty file if there is none yet.
    pub fn load_or_empty(path: &Path) -> Result<Self, TenantsError> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(TenantsFile::default())
        }
    }

    /// Writes the file whole to a temporary file next to it, then renames
    /// it into place, so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<(), TenantsError> {
        let io = |source| TenantsError::Io {
            path: path.display().to_string(),
            source,
        };
        let text =
            toml::to_string_pretty(self).map_err(|e| TenantsError::Invalid(e.to_string()))?;
        let header = "# tokenmill tenants and API keys. Keys are stored as SHA-256 hashes only;\n\
                      # add one with `tokenmill tenants add NAME`.\n\n";
        let temporary = path.with_extension("toml.tmp");
        std::fs::write(&temporary, format!("{header}{text}")).map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)
    }

    /// Makes a new key for `tenant`, adding the tenant if it is new (with
    /// `weight`, default 1; an existing tenant's weight changes only when
    /// `weight` is given).
    pub fn add_key(&mut self, tenant: &str, weight: Option<u32>) -> Result<NewKey, TenantsError> {
        if tenant.trim().is_empty() || tenant.chars().any(char::is_control) {
            return Err(TenantsError::Invalid(format!(
                "bad tenant name {tenant:?}: it must be non-empty printable text"
            )));
        }
        if weight == Some(0) {
            return Err(TenantsError::Invalid(
                "the weight must be at least 1".into(),
            ));
        }
        let index = match self.tenants.iter().position(|t| t.name == tenant) {
            Some(i) => i,
            None => {
                self.tenants.push(TenantEntry {
                    name: tenant.to_owned(),
                    weight: 1,
                    keys: Vec::new(),
                });
                self.tenants.len() - 1
            }
        };
        let entry = &mut self.tenants[index];
        if let Some(w) = weight {
            entry.weight = w;
        }
        let mut rng = rand::rng();
        let secret: String = KEY_PREFIX
            .chars()
            .chain((0..43).map(|_| char::from(rng.sample(Alphanumeric))))
            .collect();
        let id = format!("key_{:012x}", rng.random::<u64>() >> 16);
        entry.keys.push(KeyEntry {
            id: id.clone(),
            sha256: sha256_hex(&secret),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        self.check()?;
        Ok(NewKey {
            tenant: tenant.to_owned(),
            id,
            secret,
        })
    }

    fn check(&self) -> Result<(), TenantsError> {
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for tenant in &self.tenants {
            if !names.insert(&tenant.name) {
                return Err(TenantsError::Invalid(format!(
                    "tenant {:?} appears twice",
                    tenant.name
                )));
            }
            if tenant.weight == 0 {
                return Err(TenantsError::Invalid(format!(
                    "tenant {:?}: the weight must be at least 1",
                    tenant.name
                )));
            }
            for key in &tenant.keys {
                let hex_ok = key.sha256.len() == 64
                    && key
                        .sha256
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                if !hex_ok {
                    return Err(TenantsError::Invalid(format!(
                        "key {:?} of tenant {:?}: sha256 must be 64 lowercase hex digits",
                        key.id, tenant.name
                    )));
                }
                if !ids.insert(&key.id) || !hashes.insert(&key.sha256) {
                    return Err(TenantsError::Invalid(format!(
                        "key {:?} appears twice",
                        key.id
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Lowercase hex SHA-256 of `text`.
fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The keys of a tenants file, by hash, ready to authenticate requests.
#[derive(Clone, Debug, Default)]
pub struct KeyRegistry {
    by_hash: HashMap<String, Caller>,
}

impl KeyRegistry {
    /// The registry of `file`.
    pub fn new(file: &TenantsFile) -> Self {
        let mut by_hash = HashMap::new();
        for tenant in &file.tenants {
            for key in &tenant.keys {
                by_hash.insert(
                    key.sha256.clone(),
                    Caller {
                        tenant: TenantId(tenant.name.clone()),
                        key_id: KeyId(key.id.clone()),
                        weight: tenant.weight,
                    },
                );
            }
        }
        KeyRegistry { by_hash }
    }

    /// Keys known.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The caller a presented key belongs to.
    pub fn authenticate(&self, key: &str) -> Option<&Caller> {
        self.by_hash.get(&sha256_hex(key))
    }
}

/// The registry a running server authenticates against, replaced whole when
/// the tenants file is read again (`serve` does on SIGHUP): a request sees
/// the old registry or the new one, never a mix, and requests already
/// admitted keep the caller they were admitted as.
#[derive(Debug, Default)]
pub struct LiveKeys(RwLock<Arc<KeyRegistry>>);

impl LiveKeys {
    /// Starts with `registry`.
    pub fn new(registry: KeyRegistry) -> Self {
        LiveKeys(RwLock::new(Arc::new(registry)))
    }

    /// The registry now in force.
    pub fn current(&self) -> Arc<KeyRegistry> {
        // A poisoned lock still holds a whole registry: only `replace`
        // writes, and it swaps one `Arc` for another.
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `registry` in force for every request from now on.
    pub fn replace(&self, registry: KeyRegistry) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_switch_to_a_new_registry_whole() {
        let mut file = TenantsFile::default();
        let old_key = file.add_key("acme", None).unwrap().secret;
        let live = LiveKeys::new(KeyRegistry::new(&file));
        let before = live.current();
        let new_key = file.add_key("globex", Some(2)).unwrap().secret;
        live.replace(KeyRegistry::new(&file));
        assert!(
            before.authenticate(&new_key).is_none(),
            "a registry never changes"
        );
        let now = live.current();
        assert_eq!(now.authenticate(&new_key).unwrap().weight, 2);
        assert_eq!(now.authenticate(&old_key).unwrap().tenant.0, "acme");
    }

    #[test]
    fn a_new_key_authenticates_its_tenant_and_only_its_hash_is_written() {
        let dir = std::env::temp_dir().join(format!("tokenmill-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        let mut file = TenantsFile::load_or_empty(&path).unwrap();
        let acme = file.add_key("acme", Some(3)).unwrap();
        let other = file.add_key("globex", None).unwrap();
        let second = file.add_key("acme", None).unwrap();
        file.save(&path).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        for key in [&acme, &other, &second] {
            assert!(key.secret.starts_with(KEY_PREFIX) && key.secret.len() == 49);
            assert!(!text.contains(&key.secret), "a key was written in clear");
            assert!(text.contains(&key.id));
        }
        let registry = KeyRegistry::new(&TenantsFile::load(&path).unwrap());
        assert_eq!(registry.len(), 3);
        let caller = registry.authenticate(&acme.secret).unwrap();
        assert_eq!(caller.tenant.0, "acme");
        assert_eq!(caller.key_id.0, acme.id);
        assert_eq!(caller.weight, 3, "adding a key kept the weight");
        assert_eq!(
            registry.authenticate(&second.secret).unwrap().tenant.0,
            "acme"
        );
        assert_eq!(registry.authenticate(&other.secret).unwrap().weight, 1);
        assert!(registry.authenticate("sk-tm-wrong").is_none());
        assert!(registry.authenticate(&acme.secret[..48]).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let parse = |text: &str| -> Result<TenantsFile, String> {
            let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
            file.check().map_err(|e| e.to_string())?;
            Ok(file)
        };
        let hash = "a".repeat(64);
        assert!(parse(&format!(
            "[[tenant]]\nname='a'\n[[tenant.key]]\nid='k'\nsha256='{hash}'\n"
        ))
        .is_ok());
        let twice = parse("[[tenant]]\nname='a'\n[[tenant]]\nname='a'\n").unwrap_err();
        assert!(twice.contains("appears twice"), "{twice}");
        let zero = parse("[[tenant]]\nname='a'\nweight=0\n").unwrap_err();
        assert!(zero.contains("weight"), "{zero}");
        let short =
            parse("[[tenant]]\nname='a'\n[[tenant.key]]\nid='k'\nsha256='abc'\n").unwrap_err();
        assert!(short.contains("64 lowercase hex"), "{short}");
        let unknown = parse("[[tenant]]\nname='a'\npassword='x'\n").unwrap_err();
        assert!(unknown.contains("password"), "{unknown}");
        assert!(TenantsFile::default().add_key("", None).is_err());
        assert!(TenantsFile::default().add_key("a", Some(0)).is_err());
    }
}
