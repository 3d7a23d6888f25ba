//! Splitting a tensor into element-aligned chunks.

use crate::{ChunkIndex, Error};

/// The default partition size, 4 MiB (BytePS's `BYTEPS_PARTITION_BYTES` default).
pub const DEFAULT_PARTITION_BYTES: usize = 4 << 20;

/// The adaptive rule never cuts below this (unless the configured partition is smaller).
pub const ADAPTIVE_FLOOR_BYTES: usize = 128 << 10;

/// Chunks per server the adaptive rule aims for (`BPS_MIN_CHUNKS_PER_SERVER`).
pub const DEFAULT_MIN_CHUNKS_PER_SERVER: u32 = 64;

/// The partition size for one tensor: `partition_bytes`, or less for a tensor that would
/// otherwise give fewer than `min_chunks_per_server` chunks to each of `servers` servers.
///
/// A fixed partition size suits one link speed only. With BytePS's 4 MiB, a 64 MiB tensor gives
/// each of 4 servers 4 chunks: the servers' pulls of the last round cannot overlap anything, and a
/// tensor of at most 4 MiB lands on one server, whose link then carries every worker's copy.
/// Cutting each tensor into at least `servers × min_chunks_per_server` chunks spreads it over all
/// servers and keeps the pipeline's fill and drain to a few percent of the transfer. The result
/// is rounded up to 4 KiB, never exceeds `partition_bytes` and never goes below
/// [`ADAPTIVE_FLOOR_BYTES`] (or `partition_bytes`, if that is smaller), so small tensors are not
/// shredded into per-message overhead. `min_chunks_per_server == 0` or `servers == 0` turns the
/// rule off (BytePS's fixed partitions).
///
/// Every process of a job must call this with the same arguments: the scheduler places the chunks
/// it computes and the workers cut the tensor the same way.
///
/// # Examples
///
/// ```
/// use bps_scheduler::adaptive_partition_bytes;
///
/// // 64 MiB over 4 servers, 64 chunks each: 256 KiB partitions
/// assert_eq!(adaptive_partition_bytes(64 << 20, 4 << 20, 4, 64), 256 << 10);
/// // a 1 GiB tensor keeps the configured 4 MiB
/// assert_eq!(adaptive_partition_bytes(1 << 30, 4 << 20, 4, 64), 4 << 20);
/// // small tensors stop at the 128 KiB floor
/// assert_eq!(adaptive_partition_bytes(1 << 20, 4 << 20, 4, 64), 128 << 10);
/// // off
/// assert_eq!(adaptive_partition_bytes(64 << 20, 4 << 20, 4, 0), 4 << 20);
/// ```
pub fn adaptive_partition_bytes(
    total_bytes: usize,
    partition_bytes: usize,
    servers: u32,
    min_chunks_per_server: u32,
) -> usize {
    if servers == 0 || min_chunks_per_server == 0 {
        return partition_bytes;
    }
    let want = (servers as usize).saturating_mul(min_chunks_per_server as usize);
    let per_chunk = total_bytes.div_ceil(want).next_multiple_of(4096);
    per_chunk.clamp(ADAPTIVE_FLOOR_BYTES.min(partition_bytes), partition_bytes)
}

/// One contiguous byte range of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// Position of the chunk within its tensor, counted from 0.
    pub index: ChunkIndex,
    /// Byte offset of the chunk from the start of the tensor.
    pub offset: usize,
    /// Length of the chunk in bytes; a whole number of elements.
    pub len: usize,
}

impl Chunk {
    /// The byte offset one past the chunk's end (`offset + len`).
    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// The chunk size used for a given element size and partition size: `partition_bytes`
/// rounded down to a multiple of `elem_size`, but never less than one element.
///
/// This function does not fail: an `elem_size` of 0 is treated as 1 and a `partition_bytes`
/// smaller than one element gives one element. [`partition()`] rejects both zeros.
///
/// # Examples
///
/// ```
/// use bps_scheduler::chunk_bytes;
///
/// assert_eq!(chunk_bytes(4, 4096), 4096);
/// assert_eq!(chunk_bytes(12, 100), 96); // 8 elements of 12 bytes
/// assert_eq!(chunk_bytes(16, 10), 16); // at least one element
/// ```
pub fn chunk_bytes(elem_size: usize, partition_bytes: usize) -> usize {
    let elem = elem_size.max(1);
    (partition_bytes / elem).max(1) * elem
}

/// Split a tensor of `total_bytes` into chunks of [`chunk_bytes`]`(elem_size, partition_bytes)`.
///
/// The chunks cover the tensor exactly once, in order: offsets are contiguous from 0, every
/// length is a whole number of elements, and only the last chunk may be shorter. A tensor
/// smaller than one chunk gives one chunk; an empty tensor gives no chunks.
///
/// # Errors
///
/// - [`Error::ZeroElemSize`] if `elem_size` is 0;
/// - [`Error::ZeroPartitionBytes`] if `partition_bytes` is 0;
/// - [`Error::Misaligned`] if `total_bytes` is not a multiple of `elem_size`;
/// - [`Error::TooManyChunks`] if more than `u32::MAX` chunks would be needed (checked before
///   anything is allocated).
///
/// # Examples
///
/// ```
/// use bps_scheduler::{partition, ChunkIndex};
///
/// let chunks = partition(10_000, 4, 4096)?;
/// let lens: Vec<usize> = chunks.iter().map(|c| c.len).collect();
/// assert_eq!(lens, [4096, 4096, 1808]);
/// assert_eq!(chunks[2].index, ChunkIndex(2));
/// assert_eq!(chunks[2].offset, 8192);
/// # Ok::<(), bps_scheduler::Error>(())
/// ```
pub fn partition(
    total_bytes: usize,
    elem_size: usize,
    partition_bytes: usize,
) -> Result<Vec<Chunk>, Error> {
    if elem_size == 0 {
        return Err(Error::ZeroElemSize);
    }
    if partition_bytes == 0 {
        return Err(Error::ZeroPartitionBytes);
    }
    if !total_bytes.is_multiple_of(elem_size) {
        return Err(Error::Misaligned {
            total_bytes,
            elem_size,
        });
    }
    let chunk = chunk_bytes(elem_size, partition_bytes);
    let count = total_bytes.div_ceil(chunk);
    if u32::try_from(count).is_err() {
        return Err(Error::TooManyChunks {
            total_bytes,
            chunk_bytes: chunk,
            chunks: count,
        });
    }
    let mut chunks = Vec::with_capacity(count);
    let mut offset = 0;
    // `count <= u32::MAX` was checked above, so every index fits in a u32.
    for index in 0..count as u32 {
        let len = chunk.min(total_bytes - offset);
        chunks.push(Chunk {
            index: ChunkIndex(index),
            offset,
            len,
        });
        offset += len;
    }
    debug_assert_eq!(offset, total_bytes);
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(chunks: &[Chunk]) -> Vec<usize> {
        chunks.iter().map(|c| c.len).collect()
    }

    #[test]
    fn empty_tensor_has_no_chunks() {
        assert_eq!(partition(0, 4, 1024), Ok(vec![]));
    }

    #[test]
    fn sub_chunk_tensor_is_one_chunk() {
        let c = partition(12, 4, 1024).unwrap();
        assert_eq!(
            c,
            vec![Chunk {
                index: ChunkIndex(0),
                offset: 0,
                len: 12
            }]
        );
    }

    #[test]
    fn exactly_one_chunk() {
        assert_eq!(lens(&partition(1024, 4, 1024).unwrap()), [1024]);
    }

    #[test]
    fn one_element_over_gives_a_short_tail() {
        let c = partition(1028, 4, 1024).unwrap();
        assert_eq!(lens(&c), [1024, 4]);
        assert_eq!(c[1].offset, 1024);
        assert_eq!(c[1].index, ChunkIndex(1));
        // One byte over with one-byte elements.
        assert_eq!(lens(&partition(1025, 1, 1024).unwrap()), [1024, 1]);
    }

    #[test]
    fn partition_size_rounds_down_to_whole_elements() {
        // 10-byte partitions of 4-byte elements are 8-byte chunks.
        assert_eq!(chunk_bytes(4, 10), 8);
        assert_eq!(lens(&partition(20, 4, 10).unwrap()), [8, 8, 4]);
    }

    #[test]
    fn partition_smaller_than_an_element_gives_one_element_chunks() {
        assert_eq!(chunk_bytes(8, 3), 8);
        assert_eq!(lens(&partition(24, 8, 3).unwrap()), [8, 8, 8]);
    }

    #[test]
    fn chunk_bytes_treats_zero_elem_size_as_one() {
        assert_eq!(chunk_bytes(0, 10), 10);
        assert_eq!(chunk_bytes(0, 0), 1);
    }

    #[test]
    fn default_partition_is_4_mib() {
        assert_eq!(DEFAULT_PARTITION_BYTES, 4 * 1024 * 1024);
        let c = partition(10 << 20, 4, DEFAULT_PARTITION_BYTES).unwrap();
        assert_eq!(lens(&c), [4 << 20, 4 << 20, 2 << 20]);
    }

    #[test]
    fn adaptive_partition_is_bounded_and_gives_enough_chunks() {
        for servers in [1u32, 2, 4, 8, 16] {
            for p in [4096usize, 64 << 10, 1 << 20, 4 << 20, 1 << 30] {
                for total in [0usize, 1, 4096, 1 << 20, 64 << 20, 1 << 30] {
                    for k in [0u32, 1, 16, 64] {
                        let a = adaptive_partition_bytes(total, p, servers, k);
                        assert!(a <= p, "{total} {p} {servers} {k}: {a}");
                        if k == 0 {
                            assert_eq!(a, p);
                            continue;
                        }
                        assert!(a >= ADAPTIVE_FLOOR_BYTES.min(p));
                        let chunks = total.div_ceil(a);
                        // enough chunks unless a bound (floor or configured size) was hit
                        if a > ADAPTIVE_FLOOR_BYTES.min(p) && a < p {
                            assert!(
                                chunks + servers as usize > (servers * k) as usize,
                                "{total} {p} {servers} {k}: {a} gives {chunks}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(adaptive_partition_bytes(64 << 20, 4 << 20, 0, 64), 4 << 20);
    }

    #[test]
    fn errors() {
        assert_eq!(partition(8, 0, 1024), Err(Error::ZeroElemSize));
        assert_eq!(partition(8, 4, 0), Err(Error::ZeroPartitionBytes));
        assert_eq!(
            partition(10, 4, 1024),
            Err(Error::Misaligned {
                total_bytes: 10,
                elem_size: 4
            })
        );
    }

    #[test]
    fn error_messages_name_the_values() {
        let msg = partition(10, 4, 1024).unwrap_err().to_string();
        assert!(msg.contains("10") && msg.contains('4'), "{msg}");
        let msg = partition(8, 0, 1).unwrap_err().to_string();
        assert!(msg.contains("at least 1"), "{msg}");
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn too_many_chunks_fails_without_allocating() {
        let total = u32::MAX as usize + 1;
        let err = partition(total, 1, 1).unwrap_err();
        assert_eq!(
            err,
            Error::TooManyChunks {
                total_bytes: total,
                chunk_bytes: 1,
                chunks: total
            }
        );
        assert!(err.to_string().contains(&u32::MAX.to_string()));
        // Huge but countable: no error (and only the count is checked here, via a big chunk).
        assert_eq!(partition(usize::MAX, 1, usize::MAX).unwrap().len(), 1);
    }
}
