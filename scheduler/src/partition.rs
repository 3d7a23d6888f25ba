//! Splitting a tensor into element-aligned chunks.

use crate::{ChunkIndex, Error};

/// The default partition size, 4 MiB (BytePS's `BYTEPS_PARTITION_BYTES` default).
pub const DEFAULT_PARTITION_BYTES: usize = 4 << 20;

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
