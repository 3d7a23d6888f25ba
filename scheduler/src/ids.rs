//! Identifier newtypes: tensors, chunks, keys, servers and priorities.

use std::fmt;

/// A tensor declared by the framework, numbered in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

/// The position of a chunk within its tensor, counted from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkIndex(pub u32);

/// One chunk of one tensor: the unit that is pushed, summed and pulled.
///
/// Packed as `(tensor << 32) | chunk`, so keys of one tensor sort together, in chunk order.
///
/// # Examples
///
/// ```
/// use bps_scheduler::{ChunkIndex, Key, TensorId};
///
/// let key = Key::new(TensorId(3), ChunkIndex(7));
/// assert_eq!(key.0, (3 << 32) | 7);
/// assert_eq!(key.tensor(), TensorId(3));
/// assert_eq!(key.chunk(), ChunkIndex(7));
/// assert_eq!(key.to_string(), "t3.c7");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub u64);

impl Key {
    /// The key of chunk `c` of tensor `t`.
    pub fn new(t: TensorId, c: ChunkIndex) -> Key {
        Key((u64::from(t.0) << 32) | u64::from(c.0))
    }

    /// The tensor this key belongs to (the high 32 bits).
    pub fn tensor(self) -> TensorId {
        TensorId((self.0 >> 32) as u32)
    }

    /// The chunk within the tensor (the low 32 bits).
    pub fn chunk(self) -> ChunkIndex {
        ChunkIndex(self.0 as u32)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}.c{}", self.tensor().0, self.chunk().0)
    }
}

/// A summation server, numbered `0..num_servers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerIndex(pub u32);

/// Scheduling priority: a higher value leaves a queue first. The default is `Priority(0)`.
///
/// BytePS gives layers nearest the input the highest priority, since the next forward pass
/// needs them first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Priority(pub i32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_extremes() {
        for (t, c) in [
            (0, 0),
            (0, u32::MAX),
            (u32::MAX, 0),
            (u32::MAX, u32::MAX),
            (3, 0),
        ] {
            let k = Key::new(TensorId(t), ChunkIndex(c));
            assert_eq!(k.tensor(), TensorId(t));
            assert_eq!(k.chunk(), ChunkIndex(c));
        }
    }

    #[test]
    fn key_display() {
        assert_eq!(Key::new(TensorId(3), ChunkIndex(0)).to_string(), "t3.c0");
        assert_eq!(
            Key::new(TensorId(u32::MAX), ChunkIndex(12)).to_string(),
            format!("t{}.c12", u32::MAX)
        );
    }

    #[test]
    fn keys_sort_by_tensor_then_chunk() {
        let a = Key::new(TensorId(1), ChunkIndex(u32::MAX));
        let b = Key::new(TensorId(2), ChunkIndex(0));
        assert!(a < b);
        assert!(Key::new(TensorId(2), ChunkIndex(0)) < Key::new(TensorId(2), ChunkIndex(1)));
    }

    #[test]
    fn priority_default_is_zero_and_orders_by_value() {
        assert_eq!(Priority::default(), Priority(0));
        assert!(Priority(5) > Priority(-1));
    }
}
