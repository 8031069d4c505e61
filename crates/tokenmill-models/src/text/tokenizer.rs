//! A `tokenizers` tokenizer built from a GGUF file's own tokenizer metadata,
//! or read from a Hugging Face model directory's `tokenizer.json`.
//!
//! GGUF stores the vocabulary, the BPE merges, token types and the name of the
//! pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the same pipeline the
//! original Hugging Face tokenizer used: a byte-level BPE whose pre-tokenizer
//! splits text with the model family's regex, and control tokens matched as
//! whole special tokens wherever they occur in the text.

use crate::error::{ModelError, Result};
use crate::load::config::Metadata;
use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of user-defined tokens, also matched whole in text.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Names of control tokens that end a turn in the chat formats we know; like
/// llama.cpp, generation stops at any of them, not only at the declared EOS.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "</s>",
    "<end_of_turn>",
];

/// Llama 3's split regex (llama.cpp pre-tokenizer "llama-bpe").
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (llama.cpp pre-tokenizer "qwen2").
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer of a model and the ids it treats specially.
pub struct ModelTokenizer {
    inner: Tokenizer,
    bos_token: Option<(u32, String)>,
    eos_token: Option<(u32, String)>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
}

impl ModelTokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = Metadata(content);
        let kind = md.string("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model {kind:?} (only byte-level BPE, \"gpt2\", is supported)"
            )));
        }
        let tokens = md.strings("tokenizer.ggml.tokens")?;
        let merges = md.strings("tokenizer.ggml.merges")?;
        let token_types = md.ints("tokenizer.ggml.token_type").unwrap_or_default();
        let pre = md.string("tokenizer.ggml.pre").unwrap_or("default");

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| Ok(((*t).to_owned(), token_id(id)?)))
            .collect::<Result<_>>()?;
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let special: Vec<AddedToken> = token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .filter_map(|(id, _)| tokens.get(id))
            .map(|t| AddedToken::from((*t).to_owned(), true))
            .collect();
        inner.add_special_tokens(&special);

        let named = |key: &str| -> Option<(u32, String)> {
            let id = md.usize(key).ok()?;
            let text = tokens.get(id)?;
            Some((u32::try_from(id).ok()?, (*text).to_owned()))
        };
        let bos_token = named("tokenizer.ggml.bos_token_id");
        let eos_token = named("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> = eos_token.iter().map(|(id, _)| *id).collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some((id, _)) = named(key) {
                end_of_generation.push(id);
            }
        }
        for (id, ty) in token_types.iter().enumerate() {
            if *ty == TOKEN_TYPE_CONTROL && END_OF_GENERATION_TEXTS.contains(&tokens[id]) {
                end_of_generation.push(token_id(id)?);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(ModelTokenizer {
            inner,
            bos_token,
            eos_token,
            add_bos: md.bool_or("tokenizer.ggml.add_bos_token", false)?,
            end_of_generation,
        })
    }

    /// Loads `dir/tokenizer.json` with the special tokens named in
    /// `dir/tokenizer_config.json` and the end-of-sequence ids of
    /// `dir/generation_config.json` (a Hugging Face model directory).
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = crate::load::hf::TokenizerConfig::read(dir)?;
        let named = |text: Option<&String>| -> Option<(u32, String)> {
            let text = text?;
            Some((inner.token_to_id(text)?, text.clone()))
        };
        let bos_token = named(config.bos_token.as_ref());
        let eos_token = named(config.eos_token.as_ref());
        // Without an explicit `add_bos_token`, do what the tokenizer's own
        // post-processor does when asked for special tokens (Llama 3 adds
        // its BOS there).
        let add_bos = match (config.add_bos_token, &bos_token) {
            (Some(add), _) => add,
            (None, Some((bos, _))) => inner
                .encode_fast("a", true)
                .map(|e| e.get_ids().first() == Some(bos))
                .unwrap_or(false),
            (None, None) => false,
        };
        let mut end_of_generation: Vec<u32> = eos_token.iter().map(|(id, _)| *id).collect();
        end_of_generation.extend(crate::load::hf::generation_eos_ids(dir)?);
        for (id, added) in inner.get_added_tokens_decoder() {
            if added.special && END_OF_GENERATION_TEXTS.contains(&added.content.as_str()) {
                end_of_generation.push(id);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(ModelTokenizer {
            inner,
            bos_token,
            eos_token,
            add_bos,
            end_of_generation,
        })
    }

    /// Reads only the tokenizer of a `.gguf` file (its metadata, not its
    /// weights).
    pub fn from_gguf_file(path: &std::path::Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let content = Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
        Self::from_gguf(&content)
    }

    /// Token ids of `text`, with control tokens written in the text parsed as
    /// such, and the BOS token first when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            if let Some((bos, _)) = &self.bos_token {
                ids.push(*bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` exactly, without a BOS token.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; control tokens are left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The bytes token `id` stands for: a byte-level BPE token may hold part
    /// of a UTF-8 character, so its text alone cannot describe it. Control
    /// tokens give their text; unknown ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(added) = self.inner.get_added_tokens_decoder().get(&id) {
            return added.content.as_bytes().to_vec();
        }
        self.inner
            .id_to_token(id)
            .map(|piece| piece.chars().filter_map(byte_of_char).collect())
            .unwrap_or_default()
    }

    /// Whether generating `id` ends the sequence.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The text of the BOS token, for chat templates.
    pub fn bos_text(&self) -> &str {
        self.bos_token.as_ref().map_or("", |(_, t)| t)
    }

    /// The text of the EOS token, for chat templates.
    pub fn eos_text(&self) -> &str {
        self.eos_token.as_ref().map_or("", |(_, t)| t)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The byte a character of a byte-level BPE token stands for (the inverse of
/// GPT-2's byte-to-character table: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards, in byte order).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let code = c as u32;
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let shifted = code.checked_sub(0x100)?;
    (0u32..=255)
        .filter(|b| !printable(*b))
        .nth(shifted as usize)
        .and_then(|b| u8::try_from(b).ok())
}

fn token_id(index: usize) -> Result<u32> {
    u32::try_from(index).map_err(|_| ModelError::Tokenizer(format!("token id {index} too large")))
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    // Byte-level mapping of each piece; with `use_regex` it also applies the
    // GPT-2 split regex first.
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex).into();
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
    };
    Ok(match pre {
        // GPT-2's regex as is.
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // Every digit alone, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        "llama-bpe" | "llama3" => {
            Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into()
        }
        "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "pre-tokenizer {other:?} (supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2)"
            )))
        }
    })
}
