//! How each kernel is launched: grids, blocks, shared memory, the
//! flash-decoding split of long contexts and the query tiles of prefill
//! chunks. Plain functions of the shapes, so the CPU tests check them and
//! the references iterate exactly as the kernels do.

use crate::paged::PagedMeta;
use crate::{KernelError, Result};

/// Widest attention head the kernels implement (each lane of a warp holds
/// `head_dim / 32` output values in registers).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of an attention block: four warps.
pub const ATTENTION_THREADS: u32 = 128;
/// Warps of an attention block.
pub const ATTENTION_WARPS: usize = ATTENTION_THREADS as usize / 32;
/// Longest stretch of context one decode block scores; longer contexts are
/// split into partitions merged by a second kernel (flash decoding).
pub const MAX_PARTITION: usize = 512;
/// Shortest partition the split goes down to when the batch is too small to
/// fill the GPU.
pub const MIN_PARTITION: usize = 64;
/// Query tokens of one prefill block (four per warp).
pub const PREFILL_QUERY_TILE: usize = 16;

/// A launch: grid, threads per block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks along x, y and z (each at least 1).
    pub grid: (u32, u32, u32),
    /// Threads per block, along x only: a whole number of 32-thread warps,
    /// at most 1024.
    pub block: u32,
    /// Dynamic shared memory per block, in bytes (`extern __shared__`);
    /// above 48 KiB the kernel must opt in before launch.
    pub shared_bytes: u32,
}

fn dim(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| KernelError::Invalid(format!("{what}: {n} does not fit a launch")))
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Checks a head width the attention kernels implement.
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM || !head_dim.is_multiple_of(2) {
        return Err(KernelError::Unsupported(format!(
            "head width {head_dim} (even widths up to {MAX_HEAD_DIM})"
        )));
    }
    Ok(())
}

/// The flash-decoding plan of a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Positions one block scores.
    pub partition_size: usize,
    /// Partitions of the longest context (1: no merge kernel).
    pub num_partitions: usize,
    /// `tm_paged_decode_*`: grid (heads, tokens, partitions).
    pub attention: Launch,
    /// `tm_paged_decode_merge_*`: grid (heads, tokens); unused when
    /// `num_partitions` is 1.
    pub merge: Launch,
}

/// Plans a decode step of `num_tokens` queries of `num_heads` heads over
/// contexts of at most `max_context`, on a GPU of `multiprocessors` SMs.
///
/// Partitions start at [`MAX_PARTITION`] positions and are halved (down to
/// [`MIN_PARTITION`]) while the blocks would not give every SM two to run:
/// a batch of one long sequence then still spreads over the whole GPU.
pub fn decode_plan(
    num_heads: usize,
    num_tokens: usize,
    max_context: usize,
    head_dim: usize,
    multiprocessors: usize,
) -> Result<DecodePlan> {
    check_head_dim(head_dim)?;
    if max_context == 0 {
        return Err(KernelError::Invalid(
            "a decode over an empty context".into(),
        ));
    }
    let mut partition_size = MAX_PARTITION;
    let blocks = |p: usize| num_heads * num_tokens * max_context.div_ceil(p);
    while partition_size > MIN_PARTITION && blocks(partition_size) < 2 * multiprocessors {
        partition_size /= 2;
    }
    let num_partitions = max_context.div_ceil(partition_size);
    // Shared: the scaled query, one score per position, and two f32 per
    // warp for block reductions.
    let shared = (head_dim + partition_size + 2 * ATTENTION_WARPS) * 4;
    Ok(DecodePlan {
        partition_size,
        num_partitions,
        attention: Launch {
            grid: (
                dim(num_heads, "heads")?,
                dim(num_tokens, "tokens")?,
                dim(num_partitions, "partitions")?,
            ),
            block: ATTENTION_THREADS,
            shared_bytes: shared as u32,
        },
        merge: Launch {
            grid: (dim(num_heads, "heads")?, dim(num_tokens, "tokens")?, 1),
            block: ATTENTION_THREADS,
            shared_bytes: (num_partitions * 4) as u32,
        },
    })
}

/// Query tiles of a prefill (or mixed) step: each block takes up to
/// [`PREFILL_QUERY_TILE`] consecutive tokens of one sequence for one head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Per tile: its sequence.
    pub tile_seq: Vec<u32>,
    /// Per tile: its first token's index in the batch.
    pub tile_first: Vec<u32>,
    /// Per tile: its tokens (1..=PREFILL_QUERY_TILE).
    pub tile_len: Vec<u32>,
    /// Cached positions staged in shared memory at a time.
    pub kv_tile: usize,
    /// `tm_paged_prefill_*`: grid (tiles, heads).
    pub launch: Launch,
}

/// Dynamic shared memory a block may use without opting in.
pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;
/// The most dynamic shared memory a block may opt in to on sm_90.
pub const MAX_SHARED_BYTES: u32 = 227 * 1024;

/// Positions of keys and values staged per step for a head width: 32 up to
/// 128 wide (the whole block then stays within 48 KiB), 16 beyond.
pub fn prefill_kv_tile(head_dim: usize) -> usize {
    if head_dim <= 128 {
        32
    } else {
        16
    }
}

/// Plans the prefill kernel over every chunk of `meta`.
pub fn prefill_plan(meta: &PagedMeta, num_heads: usize, head_dim: usize) -> Result<PrefillPlan> {
    check_head_dim(head_dim)?;
    let mut plan = PrefillPlan {
        tile_seq: Vec::new(),
        tile_first: Vec::new(),
        tile_len: Vec::new(),
        kv_tile: prefill_kv_tile(head_dim),
        launch: Launch {
            grid: (1, 1, 1),
            block: ATTENTION_THREADS,
            shared_bytes: 0,
        },
    };
    for seq in 0..meta.num_seqs() {
        let (start, end) = (
            meta.query_start[seq] as usize,
            meta.query_start[seq + 1] as usize,
        );
        let mut first = start;
        while first < end {
            let len = PREFILL_QUERY_TILE.min(end - first);
            plan.tile_seq.push(seq as u32);
            plan.tile_first.push(first as u32);
            plan.tile_len.push(len as u32);
            first += len;
        }
    }
    // Shared: the tile's queries, a tile of keys (rows padded by one so
    // that lane j reads key j without bank conflicts) and of values, in f32.
    let shared =
        (PREFILL_QUERY_TILE * head_dim + plan.kv_tile * (head_dim + 1) + plan.kv_tile * head_dim)
            * 4;
    plan.launch = Launch {
        grid: (
            dim(plan.tile_seq.len(), "prefill tiles")?,
            dim(num_heads, "heads")?,
            1,
        ),
        block: ATTENTION_THREADS,
        shared_bytes: shared as u32,
    };
    Ok(plan)
}

/// One block per row, threads enough for four elements each (a multiple of
/// 32, at most 1024): RMSNorm, the KV write.
pub fn per_row(rows: usize, width: usize) -> Result<Launch> {
    let threads = round_up(width.div_ceil(4).max(1), 32).min(1024);
    Ok(Launch {
        grid: (dim(rows, "rows")?, 1, 1),
        block: threads as u32,
        shared_bytes: 0,
    })
}

/// Threads per block of element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// One thread per element (SiLU-and-multiply, rotary pairs).
pub fn elementwise(elements: usize) -> Result<Launch> {
    let blocks = elements.div_ceil(ELEMENTWISE_THREADS as usize);
    Ok(Launch {
        grid: (dim(blocks, "elements")?, 1, 1),
        block: ELEMENTWISE_THREADS,
        shared_bytes: 0,
    })
}

/// Batch sizes a decode step is captured as a CUDA graph for; a step of
/// `n` sequences replays the smallest that holds it, padded.
pub const GRAPH_BATCH_SIZES: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// The captured batch size a decode step of `sequences` replays, if any.
pub fn graph_batch_size(sequences: usize) -> Option<usize> {
    GRAPH_BATCH_SIZES
        .iter()
        .copied()
        .find(|b| *b >= sequences.max(1))
}

/// The context a decode graph is planned for: the step's longest context
/// rounded up to a power of two of at least [`MAX_PARTITION`], capped at the
/// model's context. A graph's launches are fixed, so its flash-decoding
/// split is planned for the class; a step in the same class reuses it.
pub fn graph_context_class(max_context: usize, model_context: usize) -> usize {
    max_context
        .max(MAX_PARTITION)
        .next_power_of_two()
        .min(model_context.max(max_context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::ChunkSpec;

    #[test]
    fn a_big_batch_keeps_whole_partitions() {
        // 32 heads x 64 tokens already fill 132 SMs many times over.
        let plan = decode_plan(32, 64, 1000, 128, 132).unwrap();
        assert_eq!(plan.partition_size, MAX_PARTITION);
        assert_eq!(plan.num_partitions, 2);
        assert_eq!(plan.attention.grid, (32, 64, 2));
        assert_eq!(plan.attention.shared_bytes, (128 + 512 + 8) * 4);
    }

    #[test]
    fn one_long_sequence_is_split_finer_to_fill_the_gpu() {
        // 16 heads x 1 token x 4096 positions: 128 blocks of 512 would
        // leave most of 132 SMs idle; partitions of 128 give 512 blocks.
        let plan = decode_plan(16, 1, 4096, 64, 132).unwrap();
        assert_eq!(plan.partition_size, 128);
        assert_eq!(plan.num_partitions, 32);
        assert!(16 * plan.num_partitions >= 2 * 132);
        // Short contexts stop at the minimum partition.
        let short = decode_plan(1, 1, 100, 64, 132).unwrap();
        assert_eq!(
            (short.partition_size, short.num_partitions),
            (MIN_PARTITION, 2)
        );
    }

    #[test]
    fn partitions_cover_every_context_exactly_once() {
        for ctx in [1, 63, 64, 65, 511, 512, 513, 5000] {
            let plan = decode_plan(4, 3, ctx, 80, 16).unwrap();
            assert!(plan.num_partitions * plan.partition_size >= ctx);
            assert!((plan.num_partitions - 1) * plan.partition_size < ctx);
        }
    }

    #[test]
    fn head_widths_outside_the_kernels_are_refused() {
        assert!(decode_plan(1, 1, 8, 258, 1).is_err());
        assert!(decode_plan(1, 1, 8, 63, 1).is_err());
        assert!(decode_plan(1, 1, 0, 64, 1).is_err());
        assert!(decode_plan(1, 0, 8, 64, 1).is_err());
    }

    #[test]
    fn prefill_tiles_cover_each_chunk_without_crossing_sequences() {
        let (a, b) = ([0u32, 1, 2], [3u32]);
        let meta = PagedMeta::new(
            16,
            4,
            [
                ChunkSpec {
                    num_tokens: 35,
                    context_len: 40,
                    block_table: &a,
                },
                ChunkSpec {
                    num_tokens: 1,
                    context_len: 9,
                    block_table: &b,
                },
            ],
        )
        .unwrap();
        let plan = prefill_plan(&meta, 12, 64).unwrap();
        assert_eq!(plan.tile_seq, vec![0, 0, 0, 1]);
        assert_eq!(plan.tile_first, vec![0, 16, 32, 35]);
        assert_eq!(plan.tile_len, vec![16, 16, 3, 1]);
        assert_eq!(plan.launch.grid, (4, 12, 1));
        assert!(plan.launch.shared_bytes <= DEFAULT_SHARED_BYTES);
        // Up to 128 wide no opt-in is needed; the widest heads opt in.
        let wide = prefill_plan(&meta, 1, 128).unwrap();
        assert!(wide.launch.shared_bytes <= DEFAULT_SHARED_BYTES);
        let widest = prefill_plan(&meta, 1, MAX_HEAD_DIM).unwrap();
        assert!(widest.launch.shared_bytes <= MAX_SHARED_BYTES);
    }

    #[test]
    fn decode_graphs_are_picked_by_batch_and_context_class() {
        assert_eq!(graph_batch_size(0), Some(1));
        assert_eq!(graph_batch_size(1), Some(1));
        assert_eq!(graph_batch_size(3), Some(4));
        assert_eq!(graph_batch_size(25), Some(32));
        assert_eq!(graph_batch_size(256), Some(256));
        assert_eq!(graph_batch_size(257), None);
        assert_eq!(graph_context_class(1, 8192), 512);
        assert_eq!(graph_context_class(513, 8192), 1024);
        assert_eq!(graph_context_class(5000, 8192), 8192);
        assert_eq!(graph_context_class(5000, 6000), 6000);
        // The class always holds the step.
        for ctx in [1, 511, 512, 513, 4097, 8192] {
            assert!(graph_context_class(ctx, 8192) >= ctx);
        }
    }

    #[test]
    fn row_and_elementwise_launches_cover_their_work() {
        assert_eq!(per_row(3, 4096).unwrap().block, 1024);
        assert_eq!(per_row(3, 576).unwrap().block, 160);
        assert_eq!(per_row(3, 1).unwrap().block, 32);
        assert!(per_row(0, 8).is_err());
        let launch = elementwise(1000).unwrap();
        assert_eq!(launch.grid.0 * launch.block, 1024);
    }
}
