//! A pool of fixed-size KV cache blocks with prefix caching.
//!
//! Blocks are handed out as [`SequenceBlocks`], which own them: dropping a
//! sequence's blocks (finished, cancelled, preempted, failed) releases them,
//! so no exit path has to remember to free anything.
//!
//! A full block is registered under a chained hash of its tokens (the hash
//! of the block before it, the tenant's cache salt, and its own tokens).
//! When its last owner lets go, the block keeps its contents and its hash in
//! the free queue; a later sequence with the same prefix and salt takes it
//! back instead of recomputing it. Allocation evicts from the front of the
//! free queue, which holds the least recently released blocks first, so the
//! cache is LRU. The salt keeps one tenant's prompts from ever serving, or
//! timing-leaking to, another tenant.

use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Identity of a full block's contents: SHA-256 over the previous block's
/// hash, the cache salt and the block's tokens.
pub type BlockHash = [u8; 32];

const NONE: u32 = u32::MAX;

/// Blocks whose reference count is zero, least recently released first; an
/// intrusive doubly linked list so a cached block can leave it in O(1).
struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    queued: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    fn with_all(n: usize) -> Self {
        let mut q = FreeQueue {
            prev: vec![NONE; n],
            next: vec![NONE; n],
            queued: vec![false; n],
            head: NONE,
            tail: NONE,
            len: 0,
        };
        for id in 0..n as u32 {
            q.push_back(id);
        }
        q
    }

    fn push_back(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(!self.queued[i]);
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail == NONE {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.queued[i] = true;
        self.len += 1;
    }

    fn remove(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(self.queued[i]);
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.queued[i] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NONE {
            return None;
        }
        self.remove(id);
        Some(id)
    }
}

struct PoolState {
    free: FreeQueue,
    ref_counts: Vec<u32>,
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
}

impl PoolState {
    /// Takes the least recently released block, evicting its cached contents.
    fn allocate(&mut self) -> Option<u32> {
        let id = self.free.pop_front()?;
        if let Some(hash) = self.hashes[id as usize].take() {
            if self.cached.get(&hash) == Some(&id) {
                self.cached.remove(&hash);
            }
        }
        self.ref_counts[id as usize] = 1;
        Some(id)
    }

    fn release(&mut self, id: u32) {
        let count = &mut self.ref_counts[id as usize];
        debug_assert!(*count > 0, "block {id} released twice");
        *count -= 1;
        if *count == 0 {
            self.free.push_back(id);
        }
    }

    /// Takes a reference on the block cached under `hash`, if any.
    fn acquire_cached(&mut self, hash: &BlockHash) -> Option<u32> {
        let id = *self.cached.get(hash)?;
        if self.ref_counts[id as usize] == 0 {
            self.free.remove(id);
        }
        self.ref_counts[id as usize] += 1;
        Some(id)
    }

    fn register(&mut self, id: u32, hash: BlockHash) {
        if self.hashes[id as usize].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, id);
            self.hashes[id as usize] = Some(hash);
        }
    }
}

/// The blocks of a KV cache of `num_blocks` blocks. Allocation, release and
/// cache hits are O(1).
#[derive(Clone)]
pub struct BlockPool {
    inner: Rc<RefCell<PoolState>>,
    block_size: usize,
    num_blocks: usize,
}

impl BlockPool {
    /// A pool over blocks `0..num_blocks` of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        BlockPool {
            inner: Rc::new(RefCell::new(PoolState {
                free: FreeQueue::with_all(num_blocks),
                ref_counts: vec![0; num_blocks],
                hashes: vec![None; num_blocks],
                cached: HashMap::new(),
            })),
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

    /// Blocks no sequence holds (cached ones included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.inner.borrow().free.len
    }

    /// Full blocks whose contents are cached under their hash.
    pub fn num_cached(&self) -> usize {
        self.inner.borrow().cached.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// An empty block list bound to this pool, caching under `salt`.
    pub fn empty_sequence(&self, salt: &str) -> SequenceBlocks {
        SequenceBlocks {
            pool: self.clone(),
            salt: salt.to_owned(),
            ids: Vec::new(),
            hashes: Vec::new(),
        }
    }
}

/// The chained hash of one full block.
fn block_hash(parent: Option<&BlockHash>, salt: &str, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.copied().unwrap_or([0; 32]));
    h.update((salt.len() as u64).to_le_bytes());
    h.update(salt.as_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// The blocks one sequence holds, in position order. Dropping it releases
/// them.
pub struct SequenceBlocks {
    pool: BlockPool,
    salt: String,
    ids: Vec<u32>,
    /// Hashes of the leading full blocks registered so far.
    hashes: Vec<BlockHash>,
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
        if needed > state.free.len {
            return false;
        }
        for _ in 0..needed {
            match state.allocate() {
                Some(id) => self.ids.push(id),
                None => unreachable!("free length checked above"),
            }
        }
        true
    }

    /// For an empty list: takes the cached blocks that hold a prefix of
    /// `tokens`, at most `limit` tokens' worth, and returns how many tokens
    /// they hold (a multiple of the block size).
    pub fn take_cached_prefix(&mut self, tokens: &[u32], limit: usize) -> usize {
        debug_assert!(self.ids.is_empty());
        let bs = self.pool.block_size;
        let mut state = self.pool.inner.borrow_mut();
        for block in tokens[..limit.min(tokens.len())].chunks_exact(bs) {
            let hash = block_hash(self.hashes.last(), &self.salt, block);
            match state.acquire_cached(&hash) {
                Some(id) => {
                    self.ids.push(id);
                    self.hashes.push(hash);
                }
                None => break,
            }
        }
        self.ids.len() * bs
    }

    /// Registers every block that the first `computed` of `tokens` fill, so
    /// later sequences can reuse them.
    pub fn register_full_blocks(&mut self, tokens: &[u32], computed: usize) {
        let bs = self.pool.block_size;
        let full = (computed / bs).min(self.ids.len());
        let mut state = self.pool.inner.borrow_mut();
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let hash = block_hash(
                self.hashes.last(),
                &self.salt,
                &tokens[i * bs..(i + 1) * bs],
            );
            state.register(self.ids[i], hash);
            self.hashes.push(hash);
        }
    }

    /// Releases every block (tail first, so the tail is evicted first).
    pub fn release(&mut self) {
        let mut state = self.pool.inner.borrow_mut();
        for id in self.ids.drain(..).rev() {
            state.release(id);
        }
        self.hashes.clear();
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
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn reserve_takes_whole_blocks_and_drop_returns_them() {
        let pool = BlockPool::new(4, 16);
        let mut a = pool.empty_sequence("t");
        assert!(a.reserve(17));
        assert_eq!(a.ids(), &[0, 1]);
        assert_eq!(a.capacity(), 32);
        assert!(a.reserve(32), "already covered");
        assert_eq!(pool.num_free(), 2);
        let mut b = pool.empty_sequence("t");
        assert!(!b.reserve(48), "three blocks are not free");
        assert_eq!(pool.num_free(), 2, "a failed reserve takes nothing");
        assert!(b.reserve(20));
        drop(a);
        assert_eq!(pool.num_free(), 2);
        drop(b);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn a_released_prefix_is_found_again_under_the_same_salt_only() {
        let pool = BlockPool::new(8, 4);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = pool.empty_sequence("tenant-a");
        assert!(a.reserve(10));
        a.register_full_blocks(&tokens, 10);
        let first_two = a.ids()[..2].to_vec();
        assert_eq!(pool.num_cached(), 2);
        drop(a);
        // Same tenant, same prefix: both full blocks come back.
        let mut b = pool.empty_sequence("tenant-a");
        assert_eq!(b.take_cached_prefix(&tokens, 9), 8);
        assert_eq!(b.ids(), first_two.as_slice());
        // Another tenant: nothing, even though the tokens are the same.
        let mut c = pool.empty_sequence("tenant-b");
        assert_eq!(c.take_cached_prefix(&tokens, 9), 0);
        // A different first block breaks the chain for everything after it.
        let mut other = tokens.clone();
        other[0] = 99;
        let mut d = pool.empty_sequence("tenant-a");
        assert_eq!(d.take_cached_prefix(&other, 9), 0);
        drop((b, c, d));
        assert_eq!(pool.num_free(), 8);
    }

    #[test]
    fn shared_blocks_are_freed_by_their_last_owner_and_evicted_lru() {
        let pool = BlockPool::new(3, 2);
        let tokens = [1, 2, 3, 4];
        let mut a = pool.empty_sequence("s");
        assert!(a.reserve(4));
        a.register_full_blocks(&tokens, 4);
        let mut b = pool.empty_sequence("s");
        assert_eq!(b.take_cached_prefix(&tokens, 4), 4);
        assert_eq!(pool.num_free(), 1);
        drop(a);
        assert_eq!(pool.num_free(), 1, "b still holds both blocks");
        drop(b);
        assert_eq!(pool.num_free(), 3);
        // Filling the pool evicts the cached blocks.
        let mut c = pool.empty_sequence("s");
        assert!(c.reserve(6));
        assert_eq!(pool.num_cached(), 0);
        drop(c);
        let mut d = pool.empty_sequence("s");
        assert_eq!(d.take_cached_prefix(&tokens, 4), 0);
    }

    /// Random reserve / register / hit / drop sequences never leak a block or
    /// free one twice.
    #[test]
    fn randomized_operations_never_leak_blocks() {
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let pool = BlockPool::new(rng.random_range(1..24), rng.random_range(1..6));
            let mut live: Vec<(SequenceBlocks, Vec<u32>)> = Vec::new();
            for _ in 0..300 {
                match rng.random_range(0..4) {
                    0 => {
                        let len: usize = rng.random_range(1..40);
                        // Few distinct prompts so that prefixes repeat.
                        let base = rng.random_range(0..3u32);
                        let tokens: Vec<u32> = (0..len as u32).map(|i| base * 1000 + i).collect();
                        let salt = ["a", "b"][rng.random_range(0..2)];
                        let mut s = pool.empty_sequence(salt);
                        let hit = s.take_cached_prefix(&tokens, len - 1);
                        assert!(hit < len);
                        if s.reserve(len) {
                            live.push((s, tokens));
                        }
                    }
                    1 if !live.is_empty() => {
                        let i = rng.random_range(0..live.len());
                        let (s, t) = &mut live[i];
                        let computed = rng.random_range(0..=t.len());
                        s.register_full_blocks(t, computed);
                    }
                    2 if !live.is_empty() => {
                        let i = rng.random_range(0..live.len());
                        live.swap_remove(i);
                    }
                    _ => {}
                }
                let held: std::collections::HashSet<u32> =
                    live.iter().flat_map(|(s, _)| s.ids().to_vec()).collect();
                assert_eq!(
                    pool.num_free() + held.len(),
                    pool.num_blocks(),
                    "seed {seed}"
                );
            }
            live.clear();
            assert_eq!(pool.num_free(), pool.num_blocks(), "seed {seed}");
        }
    }
}
