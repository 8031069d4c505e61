//! Models known by a short name, installed in the local model cache by the
//! scripts in `models/` (nothing is fetched at run time).

use std::path::PathBuf;

/// A model the fetch scripts install.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// The short name (`tokenmill serve --model NAME`), also the served name.
    pub name: &'static str,
    /// File name in the cache's `models/` folder.
    pub file_name: &'static str,
    /// The script that installs it.
    pub fetch_script: &'static str,
}

/// Every model known by name.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    fetch_script: "models/fetch-smollm2.sh",
}];

/// The cache folder: `$TOKENMILL_CACHE`, else `~/.cache/tokenmill`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOKENMILL_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("tokenmill")
}

/// The known model called `name`, if any.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

impl KnownModel {
    /// Where the fetch script puts the model.
    pub fn path(&self) -> PathBuf {
        cache_dir().join("models").join(self.file_name)
    }
}
