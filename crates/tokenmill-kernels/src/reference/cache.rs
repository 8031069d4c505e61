//! Writing new keys and values into their cache slots, and copying whole
//! blocks (a forked sequence's partly filled block, for `n > 1`).

use crate::element::Element;
use crate::paged::PAD_SLOT;

/// `tm_write_cache`: row `t` of `src` (`width` elements at
/// `t * src_stride`, so the fused qkv rows are read in place) goes to slot
/// `slot_mapping[t]` of `cache` (`[slots, width]`); rows mapped to
/// [`PAD_SLOT`] (padding of a CUDA graph's batch) are not written. Keys and
/// values are written by one call each.
///
/// # Panics
/// If a slot or a row lies outside its slice (callers build the mapping
/// with [`crate::paged::PagedMeta`], which checks the block tables).
pub fn write_cache<T: Element>(
    slot_mapping: &[u32],
    width: usize,
    src: &[T],
    src_stride: usize,
    cache: &mut [T],
) {
    for (token, slot) in slot_mapping.iter().enumerate() {
        if *slot == PAD_SLOT {
            continue;
        }
        let (from, to) = (token * src_stride, *slot as usize * width);
        cache[to..to + width].copy_from_slice(&src[from..from + width]);
    }
}

/// `tm_copy_blocks`: copies block `src` to block `dst` for each pair, in
/// one cache of blocks of `block_elems` elements. Pairs must not write a
/// block another pair reads (the kernel runs them all at once).
pub fn copy_blocks<T: Element>(pairs: &[(u32, u32)], block_elems: usize, cache: &mut [T]) {
    for &(src, dst) in pairs {
        let (src, dst) = (src as usize * block_elems, dst as usize * block_elems);
        cache.copy_within(src..src + block_elems, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::{ChunkSpec, PagedMeta};

    #[test]
    fn new_rows_land_in_their_slots_and_nowhere_else() {
        // Two sequences: 3 new tokens at positions 1..4 over blocks [2, 0]
        // of 2 slots, and a decode token at position 0 of block [1].
        let (a, b) = ([2u32, 0], [1u32]);
        let meta = PagedMeta::new(
            2,
            3,
            [
                ChunkSpec {
                    num_tokens: 3,
                    context_len: 4,
                    block_table: &a,
                },
                ChunkSpec {
                    num_tokens: 1,
                    context_len: 1,
                    block_table: &b,
                },
            ],
        )
        .unwrap();
        assert_eq!(meta.slot_mapping, vec![5, 0, 1, 2]);
        // qkv rows of 1 (q) + 2 (k) + 2 (v); token t's k is [10t, 10t+1].
        let qkv: Vec<f32> = (0..4)
            .flat_map(|t| {
                let t = t as f32;
                [-1.0, 10.0 * t, 10.0 * t + 1.0, -10.0 * t, -10.0 * t - 1.0]
            })
            .collect();
        let (mut k_cache, mut v_cache) = (vec![f32::NAN; 12], vec![f32::NAN; 12]);
        write_cache(&meta.slot_mapping, 2, &qkv[1..], 5, &mut k_cache);
        write_cache(&meta.slot_mapping, 2, &qkv[3..], 5, &mut v_cache);
        let k_expected = [
            10.0,
            11.0,
            20.0,
            21.0,
            30.0,
            31.0,
            f32::NAN,
            f32::NAN,
            f32::NAN,
            f32::NAN,
            0.0,
            1.0,
        ];
        for (got, want) in k_cache.iter().zip(k_expected) {
            assert!(
                got == &want || (got.is_nan() && want.is_nan()),
                "{k_cache:?}"
            );
        }
        assert_eq!(&v_cache[10..12], &[-0.0, -1.0]);
        assert_eq!(&v_cache[0..2], &[-10.0, -11.0]);
        // A padding row writes nothing.
        let before = k_cache.clone();
        write_cache(&[PAD_SLOT], 2, &[7.0, 7.0], 2, &mut k_cache);
        assert_eq!(format!("{before:?}"), format!("{k_cache:?}"));
    }

    #[test]
    fn copied_blocks_equal_their_sources() {
        let mut cache: Vec<f32> = (0..24).map(|x| x as f32).collect();
        copy_blocks(&[(0, 3), (2, 1)], 4, &mut cache);
        assert_eq!(&cache[12..16], &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(&cache[4..8], &[8.0, 9.0, 10.0, 11.0]);
        assert_eq!(
            &cache[16..24],
            &(16..24).map(|x| x as f32).collect::<Vec<_>>()[..]
        );
    }
}
