//! What is sent: prompts and output lengths, all derived from a seed.
//!
//! Request `i` of a workload is a pure function of (seed, i): its own random
//! stream is seeded from both, so the same seed gives the same prompts and
//! lengths in every run, at every level of a sweep, and whether the run is
//! bounded by a request count or by a duration (which does not know in
//! advance how many requests it will send).
//!
//! Synthetic prompts are made of words that are one token each in the
//! target's tokenizer and stay one token when written one after another
//! (byte-level BPE splits text at spaces before merging), so a prompt of n
//! such words is n tokens long; the length is then checked by encoding the
//! text, and corrected for tokens the tokenizer adds (a BOS token). Random
//! words also keep prompts apart, so no prefix cache can serve one request
//! from another.

use crate::{BenchError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// A distribution of token lengths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LengthSpec {
    /// Always this many.
    Fixed(u64),
    /// Uniform over `min..=max`.
    Uniform {
        /// Smallest length.
        min: u64,
        /// Largest length.
        max: u64,
    },
    /// Normal with this mean and standard deviation, rounded, and clamped to
    /// at least 1.
    Normal {
        /// Mean length.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

impl LengthSpec {
    /// Draws a length.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        match *self {
            LengthSpec::Fixed(n) => n,
            LengthSpec::Uniform { min, max } => rng.random_range(min..=max),
            LengthSpec::Normal { mean, std } => {
                // Box-Muller: two uniforms give one standard normal draw.
                let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + std * z).round().max(1.0) as u64
            }
        }
    }

    /// The smallest length it can draw.
    pub fn min(&self) -> u64 {
        match *self {
            LengthSpec::Fixed(n) => n,
            LengthSpec::Uniform { min, .. } => min,
            LengthSpec::Normal { .. } => 1,
        }
    }
}

impl fmt::Display for LengthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthSpec::Fixed(n) => write!(f, "{n}"),
            LengthSpec::Uniform { min, max } => write!(f, "uniform:{min}:{max}"),
            LengthSpec::Normal { mean, std } => write!(f, "normal:{mean}:{std}"),
        }
    }
}

impl FromStr for LengthSpec {
    type Err = String;

    /// `N`, `uniform:MIN:MAX` or `normal:MEAN:STD`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let int = |p: &str| {
            p.trim()
                .parse::<u64>()
                .map_err(|_| format!("{p:?} is not a whole number of tokens"))
        };
        let float = |p: &str| {
            p.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{p:?} is not a non-negative number"))
        };
        let spec = match parts.as_slice() {
            [n] => LengthSpec::Fixed(int(n)?),
            ["fixed", n] => LengthSpec::Fixed(int(n)?),
            ["uniform", min, max] => {
                let (min, max) = (int(min)?, int(max)?);
                if min > max {
                    return Err(format!(
                        "uniform:{min}:{max}: the minimum is over the maximum"
                    ));
                }
                LengthSpec::Uniform { min, max }
            }
            ["normal", mean, std] => LengthSpec::Normal {
                mean: float(mean)?,
                std: float(std)?,
            },
            _ => {
                return Err(format!(
                    "{s:?}: expected N, uniform:MIN:MAX or normal:MEAN:STD"
                ))
            }
        };
        if spec.min() == 0 && !matches!(spec, LengthSpec::Normal { .. }) {
            return Err(format!("{s:?}: lengths must be at least 1 token"));
        }
        Ok(spec)
    }
}

/// The tokenizer prompts are measured with: the target model's own, so that
/// "128 tokens" means 128 tokens to the server.
pub trait PromptTokenizer: Send + Sync {
    /// Tokens the server counts for `text` sent as a completion prompt
    /// (special tokens it adds, such as BOS, included).
    /// A tokenizer's failure is a [`BenchError::Tokenize`].
    fn count(&self, text: &str) -> Result<usize>;
    /// Token ids of `text` alone, with nothing added.
    fn encode_raw(&self, text: &str) -> Result<Vec<u32>>;
    /// Ids run from 0 to this, exclusive.
    fn vocab_size(&self) -> usize;
    /// The text of one token, when it is valid UTF-8 on its own.
    fn token_text(&self, id: u32) -> Option<String>;
}

/// A GGUF file's tokenizer, built the way the tokenmill server builds it.
struct GgufTokenizer(tokenmill_models::ModelTokenizer);

impl PromptTokenizer for GgufTokenizer {
    fn count(&self, text: &str) -> Result<usize> {
        self.0
            .encode(text)
            .map(|t| t.len())
            .map_err(BenchError::tokenize)
    }
    fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.0.encode_raw(text).map_err(BenchError::tokenize)
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn token_text(&self, id: u32) -> Option<String> {
        String::from_utf8(self.0.token_bytes(id)).ok()
    }
}

/// A Hugging Face `tokenizer.json`.
struct JsonTokenizer(tokenizers::Tokenizer);

impl PromptTokenizer for JsonTokenizer {
    fn count(&self, text: &str) -> Result<usize> {
        self.0
            .encode(text, true)
            .map(|e| e.len())
            .map_err(BenchError::tokenize)
    }
    fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.0
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(BenchError::tokenize)
    }
    fn vocab_size(&self) -> usize {
        self.0.get_vocab_size(true)
    }
    fn token_text(&self, id: u32) -> Option<String> {
        self.0.decode(&[id], true).ok()
    }
}

/// Loads a tokenizer from a `.gguf` model file, a `tokenizer.json`, or a
/// directory holding a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Arc<dyn PromptTokenizer>> {
    let fail = |m: String| BenchError::Workload(format!("tokenizer {}: {m}", path.display()));
    let json = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !json.exists() {
        return Err(fail("no such file".to_owned()));
    }
    if json.extension().is_some_and(|e| e == "gguf") {
        let tok = tokenmill_models::ModelTokenizer::from_gguf_file(&json)
            .map_err(|e| fail(e.to_string()))?;
        return Ok(Arc::new(GgufTokenizer(tok)));
    }
    let tok = tokenizers::Tokenizer::from_file(&json).map_err(|e| fail(e.to_string()))?;
    Ok(Arc::new(JsonTokenizer(tok)))
}

/// Words that are exactly one token, with their leading space.
#[derive(Clone, Debug)]
pub struct WordPool {
    words: Vec<String>,
}

/// Fewer words than this make prompts too repetitive to be believable text
/// for a cache or a speculative decoder.
const MIN_WORDS: usize = 64;

impl WordPool {
    /// The single-token words of `tokenizer`: a space and 2 to 10 lowercase
    /// ASCII letters, that encode back to the one token.
    pub fn new(tokenizer: &dyn PromptTokenizer) -> Result<Self> {
        let mut words = Vec::new();
        for id in 0..tokenizer.vocab_size() {
            let Ok(id) = u32::try_from(id) else { break };
            let Some(text) = tokenizer.token_text(id) else {
                continue;
            };
            let Some(word) = text.strip_prefix(' ') else {
                continue;
            };
            if !(2..=10).contains(&word.len()) || !word.bytes().all(|b| b.is_ascii_lowercase()) {
                continue;
            }
            if tokenizer.encode_raw(&text).ok().as_deref() == Some(&[id][..]) {
                words.push(text);
            }
        }
        if words.len() < MIN_WORDS {
            return Err(BenchError::Workload(format!(
                "the tokenizer has only {} single-token words; synthetic prompts need {MIN_WORDS} \
                 (use --prompts FILE instead)",
                words.len()
            )));
        }
        Ok(WordPool { words })
    }

    /// How many words there are to draw from.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn draw(&self, rng: &mut impl Rng) -> &str {
        &self.words[rng.random_range(0..self.words.len())]
    }
}

/// Tries to correct a prompt's length before giving up: each round adds or
/// removes as many words as the count is off by.
const LENGTH_ROUNDS: usize = 8;

/// A prompt that is exactly `tokens` tokens to `tokenizer`, made of random
/// words of `pool`.
pub fn synthetic_prompt(
    tokenizer: &dyn PromptTokenizer,
    pool: &WordPool,
    rng: &mut impl Rng,
    tokens: u64,
) -> Result<String> {
    let target = usize::try_from(tokens)
        .map_err(|_| BenchError::Workload(format!("{tokens} tokens is too long a prompt")))?;
    let mut words: Vec<&str> = (0..target).map(|_| pool.draw(rng)).collect();
    for _ in 0..LENGTH_ROUNDS {
        let text: String = words.concat();
        let count = tokenizer.count(&text)?;
        if count == target {
            return Ok(text);
        }
        if count > target {
            let excess = count - target;
            if excess >= words.len() {
                break;
            }
            words.truncate(words.len() - excess);
        } else {
            words.extend((0..target - count).map(|_| pool.draw(rng)));
        }
    }
    Err(BenchError::Workload(format!(
        "cannot make a prompt of exactly {tokens} tokens with this tokenizer \
         (it adds tokens of its own: ask for more)"
    )))
}

/// One line of a prompt file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    output_len: Option<u64>,
}

/// A prompt from a file, with its own output length if the file gave one.
#[derive(Clone, Debug)]
pub struct FilePrompt {
    /// The prompt text.
    pub text: String,
    /// Tokens to generate for it, overriding `--output-len`.
    pub output_len: Option<u64>,
}

/// Reads a JSONL prompt file: one `{"prompt": "...", "output_len": N}`
/// object per line (`output_len` optional); blank lines are skipped.
pub fn read_prompt_file(path: &Path) -> Result<Vec<FilePrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: PromptLine = serde_json::from_str(line).map_err(|e| {
            BenchError::Workload(format!(
                "{} line {}: {e} (expected {{\"prompt\": \"...\", \"output_len\": N}})",
                path.display(),
                n + 1
            ))
        })?;
        if parsed.prompt.is_empty() {
            return Err(BenchError::Workload(format!(
                "{} line {}: the prompt is empty",
                path.display(),
                n + 1
            )));
        }
        if parsed.output_len == Some(0) {
            return Err(BenchError::Workload(format!(
                "{} line {}: output_len must be at least 1",
                path.display(),
                n + 1
            )));
        }
        prompts.push(FilePrompt {
            text: parsed.prompt,
            output_len: parsed.output_len,
        });
    }
    if prompts.is_empty() {
        return Err(BenchError::Workload(format!(
            "{} holds no prompts",
            path.display()
        )));
    }
    Ok(prompts)
}

/// Where prompts come from.
#[derive(Clone)]
pub enum PromptSource {
    /// Random single-token words, `input` tokens long.
    Synthetic {
        /// Prompt lengths.
        input: LengthSpec,
        /// Counts the tokens.
        tokenizer: Arc<dyn PromptTokenizer>,
        /// The words.
        pool: Arc<WordPool>,
    },
    /// Lines of a prompt file, request `i` taking line `i mod n`.
    File {
        /// The file.
        path: PathBuf,
        /// Its prompts.
        prompts: Arc<Vec<FilePrompt>>,
        /// Counts their tokens, when a tokenizer was given.
        tokenizer: Option<Arc<dyn PromptTokenizer>>,
    },
}

/// The two streams of requests a run draws from: the warm-up's, which is
/// never measured, and the measured one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Warm-up requests.
    Warmup,
    /// Measured requests.
    Measured,
}

/// One request to send.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRequest {
    /// Its number in its stream.
    pub index: u64,
    /// The prompt (a completion prompt, or the user message for chat).
    pub prompt: String,
    /// The prompt's length in the workload's tokenizer, when known.
    pub expected_prompt_tokens: Option<u64>,
    /// Tokens to ask for.
    pub max_tokens: u64,
}

/// A seeded source of requests.
#[derive(Clone)]
pub struct Workload {
    source: PromptSource,
    output: LengthSpec,
    seed: u64,
}

/// SplitMix64's finaliser: spreads (seed, stream, index) over the seed space
/// so neighbouring requests get unrelated random streams.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Workload {
    /// A workload of prompts from `source` and output lengths from `output`.
    pub fn new(source: PromptSource, output: LengthSpec, seed: u64) -> Self {
        Workload {
            source,
            output,
            seed,
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Request `index` of `stream`: the same every time for the same seed.
    pub fn request(&self, stream: Stream, index: u64) -> Result<BenchRequest> {
        let stream_key = match stream {
            Stream::Measured => 0x6d65_6173,
            Stream::Warmup => 0x7761_726d,
        };
        let mut rng = StdRng::seed_from_u64(mix(mix(self.seed ^ stream_key) ^ index));
        match &self.source {
            PromptSource::Synthetic {
                input,
                tokenizer,
                pool,
            } => {
                let tokens = input.sample(&mut rng);
                let prompt = synthetic_prompt(tokenizer.as_ref(), pool, &mut rng, tokens)?;
                Ok(BenchRequest {
                    index,
                    prompt,
                    expected_prompt_tokens: Some(tokens),
                    max_tokens: self.output.sample(&mut rng),
                })
            }
            PromptSource::File {
                prompts, tokenizer, ..
            } => {
                let len = prompts.len() as u64; // never 0: read_prompt_file refuses empty files
                let line = &prompts[(index % len) as usize];
                let expected = match tokenizer {
                    Some(t) => Some(t.count(&line.text)? as u64),
                    None => None,
                };
                let drawn = self.output.sample(&mut rng);
                Ok(BenchRequest {
                    index,
                    prompt: line.text.clone(),
                    expected_prompt_tokens: expected,
                    max_tokens: line.output_len.unwrap_or(drawn),
                })
            }
        }
    }

    /// What the workload is, for the results file.
    pub fn describe(&self) -> WorkloadInfo {
        let (prompts, input_len) = match &self.source {
            PromptSource::Synthetic { input, .. } => {
                ("synthetic".to_owned(), Some(input.to_string()))
            }
            PromptSource::File { path, .. } => (format!("file:{}", path.display()), None),
        };
        WorkloadInfo {
            seed: self.seed,
            prompts,
            input_len,
            output_len: self.output.to_string(),
        }
    }
}

/// The workload as recorded in a results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// The seed.
    pub seed: u64,
    /// `synthetic` or `file:PATH`.
    pub prompts: String,
    /// The prompt length distribution (synthetic prompts only).
    pub input_len: Option<String>,
    /// The output length distribution (`output_len` in a prompt file wins).
    pub output_len: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tokenizer for tests: every space-led lowercase run is one token when
    /// it is one of a small vocabulary, and every other byte is a token; an
    /// optional BOS is added by `count`.
    pub(crate) struct ToyTokenizer {
        pub vocab: Vec<String>,
        pub bos: bool,
    }

    impl ToyTokenizer {
        pub(crate) fn new(bos: bool) -> Self {
            let mut vocab: Vec<String> = (0..=255u8).map(|b| (b as char).to_string()).collect();
            for a in b'a'..=b'j' {
                for b in b'a'..=b'j' {
                    vocab.push(format!(" {}{}x", a as char, b as char));
                }
            }
            ToyTokenizer { vocab, bos }
        }
    }

    impl PromptTokenizer for ToyTokenizer {
        fn count(&self, text: &str) -> Result<usize> {
            Ok(self.encode_raw(text)?.len() + usize::from(self.bos))
        }
        fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
            let mut out = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                if let Some(id) = self.vocab[256..]
                    .iter()
                    .position(|w| rest.starts_with(w.as_str()))
                {
                    out.push(256 + id as u32);
                    rest = &rest[self.vocab[256 + id].len()..];
                } else {
                    out.push(u32::from(rest.as_bytes()[0]));
                    rest = &rest[1..];
                }
            }
            Ok(out)
        }
        fn vocab_size(&self) -> usize {
            self.vocab.len()
        }
        fn token_text(&self, id: u32) -> Option<String> {
            self.vocab.get(id as usize).cloned()
        }
    }

    fn synthetic(bos: bool, input: LengthSpec, output: LengthSpec, seed: u64) -> Workload {
        let tok = Arc::new(ToyTokenizer::new(bos));
        let pool = Arc::new(WordPool::new(tok.as_ref()).unwrap());
        Workload::new(
            PromptSource::Synthetic {
                input,
                tokenizer: tok,
                pool,
            },
            output,
            seed,
        )
    }

    #[test]
    fn length_specs_parse_and_refuse_nonsense() {
        assert_eq!("128".parse::<LengthSpec>(), Ok(LengthSpec::Fixed(128)));
        assert_eq!(
            "uniform:10:20".parse::<LengthSpec>(),
            Ok(LengthSpec::Uniform { min: 10, max: 20 })
        );
        assert_eq!(
            "normal:100:15.5".parse::<LengthSpec>(),
            Ok(LengthSpec::Normal {
                mean: 100.0,
                std: 15.5
            })
        );
        for bad in [
            "",
            "0",
            "-3",
            "uniform:20:10",
            "uniform:0:3",
            "normal:1",
            "poisson:3",
            "x",
        ] {
            assert!(bad.parse::<LengthSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn lengths_stay_in_their_ranges() {
        let mut rng = StdRng::seed_from_u64(1);
        let u = LengthSpec::Uniform { min: 5, max: 9 };
        let draws: Vec<u64> = (0..2000).map(|_| u.sample(&mut rng)).collect();
        assert!(draws.iter().all(|d| (5..=9).contains(d)));
        assert!((5..=9).all(|v| draws.contains(&v)), "every value is drawn");
        let n = LengthSpec::Normal {
            mean: 100.0,
            std: 10.0,
        };
        let draws: Vec<f64> = (0..20000).map(|_| n.sample(&mut rng) as f64).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!((mean - 100.0).abs() < 0.5, "mean {mean}");
        assert!((var.sqrt() - 10.0).abs() < 0.5, "std {}", var.sqrt());
    }

    #[test]
    fn synthetic_prompts_have_the_exact_token_length() {
        for bos in [false, true] {
            let w = synthetic(
                bos,
                LengthSpec::Uniform { min: 2, max: 300 },
                LengthSpec::Fixed(4),
                7,
            );
            let tok = ToyTokenizer::new(bos);
            for i in 0..50 {
                let r = w.request(Stream::Measured, i).unwrap();
                let want = r.expected_prompt_tokens.unwrap() as usize;
                assert_eq!(
                    tok.count(&r.prompt).unwrap(),
                    want,
                    "bos {bos}, request {i}"
                );
            }
        }
        // One token cannot hold a BOS and a word.
        let w = synthetic(true, LengthSpec::Fixed(1), LengthSpec::Fixed(4), 7);
        assert!(w.request(Stream::Measured, 0).is_err());
    }

    #[test]
    fn the_same_seed_sends_the_same_work() {
        let spec = LengthSpec::Uniform { min: 10, max: 50 };
        let out = LengthSpec::Normal {
            mean: 20.0,
            std: 5.0,
        };
        let a = synthetic(false, spec, out, 42);
        let b = synthetic(false, spec, out, 42);
        let c = synthetic(false, spec, out, 43);
        let batch = |w: &Workload, s| {
            (0..20)
                .map(|i| w.request(s, i).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(batch(&a, Stream::Measured), batch(&b, Stream::Measured));
        assert_ne!(batch(&a, Stream::Measured), batch(&c, Stream::Measured));
        assert_ne!(batch(&a, Stream::Measured), batch(&a, Stream::Warmup));
        // Request 7 does not depend on the ones drawn before it.
        assert_eq!(
            a.request(Stream::Measured, 7).unwrap(),
            batch(&b, Stream::Measured)[7]
        );
        // Distinct prompts: no request is a prefix-cache hit of another.
        let prompts = batch(&a, Stream::Measured);
        for (i, p) in prompts.iter().enumerate() {
            for q in &prompts[i + 1..] {
                assert_ne!(p.prompt, q.prompt);
            }
        }
    }

    #[test]
    fn prompt_files_are_read_and_cycled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"one\"}\n\n{\"prompt\": \"two\", \"output_len\": 3}\n",
        )
        .unwrap();
        let prompts = read_prompt_file(&path).unwrap();
        let w = Workload::new(
            PromptSource::File {
                path: path.clone(),
                prompts: Arc::new(prompts),
                tokenizer: Some(Arc::new(ToyTokenizer::new(false))),
            },
            LengthSpec::Fixed(9),
            0,
        );
        let r: Vec<_> = (0..3)
            .map(|i| w.request(Stream::Measured, i).unwrap())
            .collect();
        assert_eq!(r[0].prompt, "one");
        assert_eq!(r[0].max_tokens, 9);
        assert_eq!(r[0].expected_prompt_tokens, Some(3));
        assert_eq!(r[1].max_tokens, 3);
        assert_eq!(r[2].prompt, "one");

        for (body, needle) in [
            ("{\"prompt\": 3}\n", "line 1"),
            ("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n", "line 2"),
            ("{\"prompt\": \"\"}\n", "empty"),
            ("\n\n", "no prompts"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = read_prompt_file(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
    }
}
