//! KV block management: which cache blocks each sequence owns.

mod block_pool;

pub use block_pool::{BlockHash, BlockPool, SequenceBlocks};
