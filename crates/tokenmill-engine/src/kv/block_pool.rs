//! A pool of fixed-size KV cache blocks.
//!
//! Blocks are handed out as [`SequenceBlocks`], which own them: dropping a
//! sequence's blocks (finished, cancelled, preempted, failed) returns them to
//! the pool, so no exit path has to remember to free anything.

use std::cell::RefCell;
use std::rc::Rc;

/// The free list of a KV cache of `num_blocks` blocks. Allocation and release
/// are O(1).
#[derive(Clone)]
pub struct BlockPool {
    inner: Rc<RefCell<PoolState>>,
    block_size: usize,
    num_blocks: usize,
}

struct PoolState {
    free: Vec<u32>,
}

impl BlockPool {
    /// A pool over blocks `0..num_blocks` of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        // Reversed so that blocks are handed out in ascending order.
        let free = (0..num_blocks as u32).rev().collect();
        BlockPool {
            inner: Rc::new(RefCell::new(PoolState { free })),
            block_size,
            num_blocks,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks not owned by any sequence.
    pub fn num_free(&self) -> usize {
        self.inner.borrow().free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// An empty block list bound to this pool.
    pub fn empty_sequence(&self) -> SequenceBlocks {
        SequenceBlocks {
            pool: self.clone(),
            ids: Vec::new(),
        }
    }
}

/// The blocks one sequence owns, in position order. Dropping it frees them.
pub struct SequenceBlocks {
    pool: BlockPool,
    ids: Vec<u32>,
}

impl SequenceBlocks {
    /// Block ids, in position order (the sequence's block table).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Tokens these blocks can hold.
    pub fn capacity(&self) -> usize {
        self.ids.len() * self.pool.block_size
    }

    /// Grows the list until it holds `tokens` tokens. Returns `false`, having
    /// taken nothing, when the pool has too few free blocks.
    pub fn reserve(&mut self, tokens: usize) -> bool {
        let needed = self.pool.blocks_for(tokens).saturating_sub(self.ids.len());
        let mut state = self.pool.inner.borrow_mut();
        if needed > state.free.len() {
            return false;
        }
        let at = state.free.len() - needed;
        self.ids.extend(state.free.drain(at..).rev());
        true
    }

    /// Returns every block to the pool.
    pub fn release(&mut self) {
        self.pool
            .inner
            .borrow_mut()
            .free
            .extend(self.ids.drain(..).rev());
    }
}

impl Drop for SequenceBlocks {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_takes_whole_blocks_and_drop_returns_them() {
        let pool = BlockPool::new(4, 16);
        let mut a = pool.empty_sequence();
        assert!(a.reserve(17));
        assert_eq!(a.ids(), &[0, 1]);
        assert_eq!(a.capacity(), 32);
        assert!(a.reserve(32), "already covered");
        assert_eq!(pool.num_free(), 2);
        let mut b = pool.empty_sequence();
        assert!(!b.reserve(48), "three blocks are not free");
        assert_eq!(pool.num_free(), 2, "a failed reserve takes nothing");
        assert!(b.reserve(20));
        drop(a);
        assert_eq!(pool.num_free(), 2);
        drop(b);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn released_blocks_are_reused() {
        let pool = BlockPool::new(2, 4);
        let mut a = pool.empty_sequence();
        assert!(a.reserve(8));
        a.release();
        assert!(a.ids().is_empty());
        let mut b = pool.empty_sequence();
        assert!(b.reserve(8));
        assert_eq!(pool.num_free(), 0);
    }
}
