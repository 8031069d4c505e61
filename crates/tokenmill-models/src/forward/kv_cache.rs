//! The paged KV cache: keys and values of every layer kept in fixed-size
//! blocks, addressed through per-sequence block tables.
//!
//! A token at position `p` of a sequence lives in slot
//! `block_table[p / block_size] * block_size + p % block_size`. Which blocks a
//! sequence owns is the engine's business (its block pool); this module only
//! stores them. The forward's kernels write and read a layer's tensors
//! ([`PagedKvCache::layer`]) in place; [`PagedKvCache::write`] and
//! [`PagedKvCache::gather`] serve the candle-ops forward.

use super::batch::SequenceChunk;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Keys and values of all layers, `[num_blocks * block_size, kv_width]` each.
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl PagedKvCache {
    /// Allocates a zeroed cache.
    pub fn new(
        num_layers: usize,
        kv_width: usize,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        let slots = block_size * num_blocks;
        let zeros = || Tensor::zeros((slots, kv_width), DType::F32, device);
        Ok(PagedKvCache {
            block_size,
            num_blocks,
            keys: (0..num_layers)
                .map(|_| zeros())
                .collect::<candle_core::Result<_>>()?,
            values: (0..num_layers)
                .map(|_| zeros())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The keys and values of `layer`, `[slots, kv_width]` each.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Writes the chunk's new keys and values (`[num_tokens, kv_width]`) into
    /// its slots of `layer`, one contiguous run per block touched.
    pub fn write(
        &self,
        layer: usize,
        chunk: &SequenceChunk,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<()> {
        let mut offset = 0;
        for (slot, len) in slot_runs(chunk, self.block_size) {
            self.keys[layer].slice_set(&keys.narrow(0, offset, len)?.contiguous()?, 0, slot)?;
            self.values[layer].slice_set(&values.narrow(0, offset, len)?.contiguous()?, 0, slot)?;
            offset += len;
        }
        Ok(())
    }

    /// Keys and values of the chunk's whole context in `layer`,
    /// `[context_len, kv_width]` each.
    pub fn gather(
        &self,
        layer: usize,
        chunk: &SequenceChunk,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let slots: Vec<u32> = (0..chunk.context_len)
            .map(|p| slot_of(&chunk.block_table, self.block_size, p) as u32)
            .collect();
        let slots = Tensor::new(slots.as_slice(), device)?;
        Ok((
            self.keys[layer].index_select(&slots, 0)?,
            self.values[layer].index_select(&slots, 0)?,
        ))
    }
}

/// The slot of position `position` of a sequence.
pub fn slot_of(block_table: &[u32], block_size: usize, position: usize) -> usize {
    block_table[position / block_size] as usize * block_size + position % block_size
}

/// The chunk's new positions as runs of contiguous slots: `(first slot, length)`.
pub fn slot_runs(chunk: &SequenceChunk, block_size: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut position = chunk.start_position();
    while position < chunk.context_len {
        let in_block = block_size - position % block_size;
        let len = in_block.min(chunk.context_len - position);
        runs.push((slot_of(&chunk.block_table, block_size, position), len));
        position += len;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::batch::LogitRows;

    fn chunk(num_tokens: usize, context_len: usize, block_table: Vec<u32>) -> SequenceChunk {
        SequenceChunk {
            num_tokens,
            context_len,
            block_table,
            logits: LogitRows::Last,
        }
    }

    #[test]
    fn runs_split_at_block_boundaries() {
        // Positions 2..11 over blocks [7, 3, 5] of 4 slots: 2,3 in block 7;
        // 4..7 in block 3; 8..10 in block 5.
        let c = chunk(9, 11, vec![7, 3, 5]);
        assert_eq!(slot_runs(&c, 4), vec![(30, 2), (12, 4), (20, 3)]);
    }

    #[test]
    fn a_decode_token_is_one_run() {
        let c = chunk(1, 6, vec![1, 0]);
        assert_eq!(slot_runs(&c, 4), vec![(1, 1)]);
    }

    #[test]
    fn gather_returns_what_write_stored_in_order() {
        let device = Device::Cpu;
        let cache = PagedKvCache::new(1, 2, 4, 4, &device).unwrap();
        let c = chunk(6, 6, vec![2, 0]);
        let k = Tensor::arange(0f32, 12.0, &device)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let v = (&k * 10.0).unwrap();
        cache.write(0, &c, &k, &v).unwrap();
        let (gk, gv) = cache.gather(0, &c, &device).unwrap();
        assert_eq!(gk.to_vec2::<f32>().unwrap(), k.to_vec2::<f32>().unwrap());
        assert_eq!(gv.to_vec2::<f32>().unwrap(), v.to_vec2::<f32>().unwrap());
        // Then a decode token at position 6 lands in block 0, slot 2.
        let d = chunk(1, 7, vec![2, 0]);
        let k1 = Tensor::new(&[[100f32, 101.0]], &device).unwrap();
        cache.write(0, &d, &k1, &k1).unwrap();
        let (gk, _) = cache.gather(0, &d, &device).unwrap();
        assert_eq!(gk.to_vec2::<f32>().unwrap()[6], vec![100.0, 101.0]);
        assert_eq!(gk.to_vec2::<f32>().unwrap()[5], vec![10.0, 11.0]);
    }
}
