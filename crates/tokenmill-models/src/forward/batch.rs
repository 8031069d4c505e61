//! The input of one model forward: a flat batch of tokens from many sequences.

use crate::error::{ModelError, Result};

/// Which logit rows a sequence chunk wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// None: a prefill chunk that does not end the prompt.
    None,
    /// The last token's row: the distribution of the next token.
    Last,
    /// Every token's row (scoring and teacher-forced tests).
    All,
}

/// The new tokens of one sequence in a forward batch.
///
/// The chunk's tokens sit at positions `context_len - num_tokens ..
/// context_len`; earlier positions must already be in the KV cache, in the
/// blocks named by `block_table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceChunk {
    /// Tokens of this sequence in the batch (at least one).
    pub num_tokens: usize,
    /// Tokens of the sequence in the KV cache once this chunk is written.
    pub context_len: usize,
    /// KV block ids of the sequence, in order; must cover `context_len`.
    pub block_table: Vec<u32>,
    /// Which logit rows to return.
    pub logits: LogitRows,
}

impl SequenceChunk {
    /// Position of the chunk's first token.
    pub fn start_position(&self) -> usize {
        self.context_len - self.num_tokens
    }

    /// Logit rows this chunk contributes to the output.
    pub fn logit_rows(&self) -> usize {
        match self.logits {
            LogitRows::None => 0,
            LogitRows::Last => 1,
            LogitRows::All => self.num_tokens,
        }
    }
}

/// Tokens of many sequences, flattened in sequence order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// Token ids, the chunks' tokens one after another.
    pub tokens: Vec<u32>,
    /// One entry per sequence, in the order of `tokens`.
    pub chunks: Vec<SequenceChunk>,
}

impl ForwardBatch {
    /// Adds a sequence's next tokens.
    pub fn push(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        block_table: Vec<u32>,
        logits: LogitRows,
    ) {
        self.tokens.extend_from_slice(tokens);
        self.chunks.push(SequenceChunk {
            num_tokens: tokens.len(),
            context_len,
            block_table,
            logits,
        });
    }

    /// Total logit rows the forward returns.
    pub fn logit_rows(&self) -> usize {
        self.chunks.iter().map(SequenceChunk::logit_rows).sum()
    }

    /// The position of every token, in batch order.
    pub fn positions(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|c| (c.start_position()..c.context_len).map(|p| p as u32))
            .collect()
    }

    /// The kernels' view of the batch in a cache of `num_blocks` blocks of
    /// `block_size` tokens: block tables, positions and slots.
    #[cfg(any(test, feature = "cuda"))]
    pub(crate) fn paged_meta(
        &self,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<tokenmill_kernels::paged::PagedMeta> {
        use tokenmill_kernels::paged::{ChunkSpec, PagedMeta};
        PagedMeta::new(
            block_size,
            num_blocks,
            self.chunks.iter().map(|c| ChunkSpec {
                num_tokens: c.num_tokens,
                context_len: c.context_len,
                block_table: &c.block_table,
            }),
        )
        .map_err(|e| ModelError::InvalidBatch(e.to_string()))
    }

    /// Checks that the chunks add up to the tokens and that every chunk's
    /// blocks cover its context in a cache of `num_blocks` blocks of
    /// `block_size` tokens.
    pub fn validate(
        &self,
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
    ) -> Result<()> {
        let total: usize = self.chunks.iter().map(|c| c.num_tokens).sum();
        if total != self.tokens.len() || self.tokens.is_empty() {
            return Err(ModelError::InvalidBatch(format!(
                "{} tokens but chunks account for {total}",
                self.tokens.len()
            )));
        }
        for chunk in &self.chunks {
            if chunk.num_tokens == 0 || chunk.num_tokens > chunk.context_len {
                return Err(ModelError::InvalidBatch(format!(
                    "chunk of {} tokens in a context of {}",
                    chunk.num_tokens, chunk.context_len
                )));
            }
            if chunk.context_len > max_positions {
                return Err(ModelError::InvalidBatch(format!(
                    "context of {} tokens exceeds the model's {max_positions}",
                    chunk.context_len
                )));
            }
            if chunk.block_table.len() * block_size < chunk.context_len {
                return Err(ModelError::InvalidBatch(format!(
                    "{} blocks of {block_size} cannot hold {} tokens",
                    chunk.block_table.len(),
                    chunk.context_len
                )));
            }
            if let Some(bad) = chunk
                .block_table
                .iter()
                .find(|b| **b as usize >= num_blocks)
            {
                return Err(ModelError::InvalidBatch(format!(
                    "block {bad} outside a cache of {num_blocks} blocks"
                )));
            }
        }
        Ok(())
    }
}
