//! The crate's one error type.

/// Everything that can go wrong in `bps-scheduler`.
///
/// Every message names the offending values and what would have been allowed, so a bad
/// configuration value can be traced back to the variable that produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `partition` was given an element size of zero bytes.
    #[error("element size is 0 bytes; it must be at least 1 byte")]
    ZeroElemSize,

    /// `partition` was given a partition size of zero bytes.
    #[error("partition size is 0 bytes; it must be at least 1 byte (BYTEPS_PARTITION_BYTES)")]
    ZeroPartitionBytes,

    /// The tensor's byte length is not a whole number of elements.
    #[error(
        "tensor of {total_bytes} bytes is not a whole number of {elem_size}-byte elements; \
         its size must be a multiple of {elem_size}"
    )]
    Misaligned {
        /// The tensor's length in bytes.
        total_bytes: usize,
        /// The size of one element in bytes.
        elem_size: usize,
    },

    /// Partitioning would produce more chunks than a [`ChunkIndex`](crate::ChunkIndex) can number.
    #[error(
        "tensor of {total_bytes} bytes in {chunk_bytes}-byte chunks needs {chunks} chunks; \
         at most {max} are allowed (raise the partition size)",
        max = u32::MAX
    )]
    TooManyChunks {
        /// The tensor's length in bytes.
        total_bytes: usize,
        /// The chunk size in bytes after rounding to whole elements.
        chunk_bytes: usize,
        /// How many chunks the tensor would need.
        chunks: usize,
    },

    /// A [`ServerAssigner`](crate::ServerAssigner) was asked to spread keys over no servers.
    #[error("number of servers is 0; at least 1 server is needed to own keys")]
    NoServers,
}
