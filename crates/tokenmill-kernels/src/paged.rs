//! The metadata the paged attention and cache kernels read each step, built
//! on the host from the batch's sequence chunks.
//!
//! A chunk is the new tokens of one sequence: `num_tokens` tokens at
//! positions `context_len - num_tokens .. context_len`, whose keys and values
//! go to the slots named by the sequence's block table. Token `t` of the
//! batch (chunks' tokens one after another) attends causally to positions
//! `0..=position[t]` of its sequence.

use crate::{KernelError, Result};

/// The slot of a padding row (a CUDA graph replays a fixed batch size; the
/// rows past the real ones write nothing to the cache).
pub const PAD_SLOT: u32 = u32::MAX;

/// One sequence's part of a batch, as the caller describes it.
#[derive(Clone, Copy, Debug)]
pub struct ChunkSpec<'a> {
    /// New tokens of the sequence in this batch (at least one).
    pub num_tokens: usize,
    /// Tokens in the cache once the chunk is written.
    pub context_len: usize,
    /// The sequence's cache blocks, in order; must cover `context_len`.
    pub block_table: &'a [u32],
}

/// Flat, padded arrays that the kernels index directly (all `u32`, so one
/// upload per array).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PagedMeta {
    /// Tokens per cache block.
    pub block_size: usize,
    /// Block-table row length: the longest table, the others padded with 0
    /// (never read: lengths bound every access).
    pub max_blocks: usize,
    /// `[num_seqs, max_blocks]` block ids.
    pub block_tables: Vec<u32>,
    /// Per sequence: tokens in the cache after this step.
    pub context_lens: Vec<u32>,
    /// Per sequence plus one: the index of its first token in the batch
    /// (`query_start[s + 1] - query_start[s]` tokens).
    pub query_start: Vec<u32>,
    /// Per token: its sequence.
    pub token_seq: Vec<u32>,
    /// Per token: its position in its sequence.
    pub positions: Vec<u32>,
    /// Per token: the cache slot its key and value are written to.
    pub slot_mapping: Vec<u32>,
    /// The longest context in the batch.
    pub max_context: usize,
    /// The most new tokens of one sequence (1 for a decode-only batch).
    pub max_query_len: usize,
}

impl PagedMeta {
    /// Builds the metadata of `chunks` for a cache of `num_blocks` blocks of
    /// `block_size` tokens, refusing chunks the kernels would read out of
    /// bounds for.
    pub fn new<'a>(
        block_size: usize,
        num_blocks: usize,
        chunks: impl IntoIterator<Item = ChunkSpec<'a>>,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(KernelError::Invalid("block size 0".into()));
        }
        let chunks: Vec<ChunkSpec<'a>> = chunks.into_iter().collect();
        let max_blocks = chunks
            .iter()
            .map(|c| c.block_table.len())
            .max()
            .unwrap_or(0);
        let mut meta = PagedMeta {
            block_size,
            max_blocks,
            query_start: vec![0],
            ..PagedMeta::default()
        };
        let slots = num_blocks * block_size;
        if slots > u32::MAX as usize {
            return Err(KernelError::Unsupported(format!(
                "{slots} cache slots do not fit 32-bit slot ids"
            )));
        }
        for (seq, chunk) in chunks.iter().enumerate() {
            if chunk.num_tokens == 0 || chunk.num_tokens > chunk.context_len {
                return Err(KernelError::Invalid(format!(
                    "sequence {seq}: {} new tokens in a context of {}",
                    chunk.num_tokens, chunk.context_len
                )));
            }
            if chunk.block_table.len() * block_size < chunk.context_len {
                return Err(KernelError::Invalid(format!(
                    "sequence {seq}: {} blocks of {block_size} cannot hold {} tokens",
                    chunk.block_table.len(),
                    chunk.context_len
                )));
            }
            if let Some(bad) = chunk
                .block_table
                .iter()
                .find(|b| **b as usize >= num_blocks)
            {
                return Err(KernelError::Invalid(format!(
                    "sequence {seq}: block {bad} outside a cache of {num_blocks}"
                )));
            }
            meta.block_tables.extend_from_slice(chunk.block_table);
            meta.block_tables.resize(
                meta.block_tables.len() + max_blocks - chunk.block_table.len(),
                0,
            );
            meta.context_lens.push(chunk.context_len as u32);
            let start = chunk.context_len - chunk.num_tokens;
            for position in start..chunk.context_len {
                meta.token_seq.push(seq as u32);
                meta.positions.push(position as u32);
                meta.slot_mapping
                    .push(slot_of(chunk.block_table, block_size, position) as u32);
            }
            meta.query_start.push(meta.positions.len() as u32);
            meta.max_context = meta.max_context.max(chunk.context_len);
            meta.max_query_len = meta.max_query_len.max(chunk.num_tokens);
        }
        Ok(meta)
    }

    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Whether every sequence brings exactly one token (a decode step).
    pub fn is_decode_only(&self) -> bool {
        self.max_query_len <= 1
    }

    /// The slot of `position` of sequence `seq`, read through the padded
    /// table exactly as the kernels read it.
    pub fn slot(&self, seq: usize, position: usize) -> usize {
        let block = self.block_tables[seq * self.max_blocks + position / self.block_size];
        block as usize * self.block_size + position % self.block_size
    }
}

impl PagedMeta {
    /// This decode step's metadata padded for a CUDA graph captured for
    /// `batch` sequences and block tables `table_width` wide: every table
    /// row widened with zeros, and `batch - num_seqs` padding sequences of
    /// one token at position 0 over block 0 whose keys and values go
    /// nowhere ([`PAD_SLOT`]). Their attention reads block 0 (always valid
    /// memory) and their outputs are dropped.
    pub fn padded_decode(&self, batch: usize, table_width: usize) -> Result<PagedMeta> {
        if !self.is_decode_only() || self.num_seqs() > batch || self.max_blocks > table_width {
            return Err(KernelError::Invalid(format!(
                "a step of {} sequences ({} tokens, tables of {}) does not fit a graph of {batch} \
                 sequences with tables of {table_width}",
                self.num_seqs(),
                self.num_tokens(),
                self.max_blocks
            )));
        }
        let mut padded = PagedMeta {
            block_size: self.block_size,
            max_blocks: table_width,
            max_context: self.max_context,
            max_query_len: 1,
            query_start: vec![0],
            ..PagedMeta::default()
        };
        for seq in 0..batch {
            let real = seq < self.num_seqs();
            let row = if real {
                &self.block_tables[seq * self.max_blocks..(seq + 1) * self.max_blocks]
            } else {
                &[]
            };
            padded.block_tables.extend_from_slice(row);
            padded.block_tables.resize((seq + 1) * table_width, 0);
            padded
                .context_lens
                .push(if real { self.context_lens[seq] } else { 1 });
            padded.token_seq.push(seq as u32);
            padded
                .positions
                .push(if real { self.positions[seq] } else { 0 });
            padded.slot_mapping.push(if real {
                self.slot_mapping[seq]
            } else {
                PAD_SLOT
            });
            padded.query_start.push(seq as u32 + 1);
        }
        Ok(padded)
    }
}

/// The slot of `position` in a sequence with `block_table`.
pub fn slot_of(block_table: &[u32], block_size: usize, position: usize) -> usize {
    block_table[position / block_size] as usize * block_size + position % block_size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(num_tokens: usize, context_len: usize, table: &[u32]) -> ChunkSpec<'_> {
        ChunkSpec {
            num_tokens,
            context_len,
            block_table: table,
        }
    }

    #[test]
    fn a_mixed_batch_flattens_in_chunk_order() {
        // A decode token at position 5 (blocks [3, 1] of 4) and a prefill
        // chunk of 3 tokens at positions 2..5 (blocks [0, 2]).
        let meta = PagedMeta::new(4, 4, [spec(1, 6, &[3, 1]), spec(3, 5, &[0, 2])]).unwrap();
        assert_eq!(meta.max_blocks, 2);
        assert_eq!(meta.block_tables, vec![3, 1, 0, 2]);
        assert_eq!(meta.context_lens, vec![6, 5]);
        assert_eq!(meta.query_start, vec![0, 1, 4]);
        assert_eq!(meta.token_seq, vec![0, 1, 1, 1]);
        assert_eq!(meta.positions, vec![5, 2, 3, 4]);
        // Position 5 of [3, 1]: block 1, offset 1 -> slot 5; positions 2, 3
        // of [0, 2] in block 0, position 4 in block 2 -> slot 8.
        assert_eq!(meta.slot_mapping, vec![5, 2, 3, 8]);
        assert_eq!((meta.max_context, meta.max_query_len), (6, 3));
        assert!(!meta.is_decode_only());
    }

    #[test]
    fn padded_tables_read_like_the_originals() {
        let tables: [&[u32]; 3] = [&[7], &[2, 5, 1], &[4, 0]];
        let meta = PagedMeta::new(
            2,
            8,
            [
                spec(1, 2, tables[0]),
                spec(1, 6, tables[1]),
                spec(1, 3, tables[2]),
            ],
        )
        .unwrap();
        assert!(meta.is_decode_only());
        for (seq, table) in tables.iter().enumerate() {
            for position in 0..meta.context_lens[seq] as usize {
                assert_eq!(meta.slot(seq, position), slot_of(table, 2, position));
            }
        }
    }

    #[test]
    fn a_padded_decode_step_keeps_the_real_rows_and_pads_harmlessly() {
        let (a, b) = ([3u32, 1], [2u32]);
        let meta = PagedMeta::new(4, 4, [spec(1, 6, &a), spec(1, 3, &b)]).unwrap();
        let padded = meta.padded_decode(4, 3).unwrap();
        assert_eq!(padded.num_seqs(), 4);
        assert_eq!(
            padded.block_tables,
            vec![3, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(padded.positions, vec![5, 2, 0, 0]);
        assert_eq!(padded.slot_mapping, vec![5, 10, PAD_SLOT, PAD_SLOT]);
        assert_eq!(padded.context_lens, vec![6, 3, 1, 1]);
        assert_eq!(padded.query_start, vec![0, 1, 2, 3, 4]);
        for seq in 0..2 {
            for p in 0..meta.context_lens[seq] as usize {
                assert_eq!(padded.slot(seq, p), meta.slot(seq, p));
            }
        }
        assert!(padded.is_decode_only());
        // Too many sequences, too wide tables, or a prefill do not fit.
        assert!(meta.padded_decode(1, 3).is_err());
        assert!(meta.padded_decode(4, 1).is_err());
        let prefill = PagedMeta::new(4, 4, [spec(2, 6, &a)]).unwrap();
        assert!(prefill.padded_decode(4, 3).is_err());
    }

    #[test]
    fn tables_that_do_not_fit_are_refused() {
        assert!(PagedMeta::new(4, 4, [spec(1, 9, &[0, 1])]).is_err());
        assert!(PagedMeta::new(4, 4, [spec(1, 3, &[4])]).is_err());
        assert!(PagedMeta::new(4, 4, [spec(0, 3, &[0])]).is_err());
        assert!(PagedMeta::new(4, 4, [spec(4, 3, &[0])]).is_err());
        assert!(PagedMeta::new(0, 4, [spec(1, 1, &[0])]).is_err());
    }
}
