//! Key → server assignment that balances bytes.

use std::collections::HashMap;

use crate::{Chunk, Error, Key, ServerIndex, TensorId};

/// Assigns each key to one summation server, balancing the bytes each server owns.
///
/// The rule is greedy: a new key goes to the server with the fewest bytes assigned so far, the
/// lowest index on ties. There is no randomness and no hashing of keys into the answer, so two
/// assigners fed the same sequence of `(key, bytes)` give identical answers. In bps the
/// assigner runs in one place (the rendezvous) and ships its answers to every worker.
///
/// After any sequence of assignments, `max(load) - min(load)` is at most the largest single
/// `bytes` assigned (each key lands on a least-loaded server, so the spread never grows past
/// one item).
///
/// A key keeps the server it was first given: assigning it again returns the same server and
/// does not count its bytes twice.
///
/// # Examples
///
/// ```
/// use bps_scheduler::{ChunkIndex, Key, ServerAssigner, ServerIndex, TensorId};
///
/// let mut a = ServerAssigner::new(2)?;
/// let key = |c| Key::new(TensorId(0), ChunkIndex(c));
/// assert_eq!(a.assign(key(0), 100), ServerIndex(0));
/// assert_eq!(a.assign(key(1), 30), ServerIndex(1));
/// assert_eq!(a.assign(key(2), 30), ServerIndex(1));
/// assert_eq!(a.loads(), [100, 60]);
/// # Ok::<(), bps_scheduler::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ServerAssigner {
    loads: Vec<u64>,
    owners: HashMap<Key, ServerIndex>,
}

impl ServerAssigner {
    /// An assigner over servers `0..num_servers`, all empty.
    ///
    /// # Errors
    ///
    /// [`Error::NoServers`] if `num_servers` is 0.
    pub fn new(num_servers: u32) -> Result<Self, Error> {
        if num_servers == 0 {
            return Err(Error::NoServers);
        }
        Ok(ServerAssigner {
            loads: vec![0; num_servers as usize],
            owners: HashMap::new(),
        })
    }

    /// Give `key`, of `bytes` bytes, to the server with the fewest bytes assigned so far
    /// (lowest index on ties), and return that server.
    ///
    /// A key that already has a server keeps it; its bytes are not counted again.
    pub fn assign(&mut self, key: Key, bytes: u64) -> ServerIndex {
        if let Some(&server) = self.owners.get(&key) {
            return server;
        }
        // `min_by_key` returns the first of equal minima, i.e. the lowest index.
        let (index, _) = self
            .loads
            .iter()
            .enumerate()
            .min_by_key(|&(_, load)| *load)
            .expect("new() guarantees at least one server");
        self.loads[index] = self.loads[index].saturating_add(bytes);
        // `loads.len()` came from a u32 in `new`, so every index fits.
        let server = ServerIndex(index as u32);
        self.owners.insert(key, server);
        server
    }

    /// Assign every chunk of `tensor`, in the order given; returns one server per chunk.
    pub fn assign_tensor(&mut self, tensor: TensorId, chunks: &[Chunk]) -> Vec<ServerIndex> {
        chunks
            .iter()
            .map(|c| self.assign(Key::new(tensor, c.index), c.len as u64))
            .collect()
    }

    /// The server `key` was assigned to, if any.
    pub fn server_of(&self, key: Key) -> Option<ServerIndex> {
        self.owners.get(&key).copied()
    }

    /// Bytes assigned to each server so far, indexed by server.
    pub fn loads(&self) -> &[u64] {
        &self.loads
    }

    /// How many servers keys are spread over.
    pub fn num_servers(&self) -> u32 {
        // `loads.len()` came from a u32 in `new`.
        self.loads.len() as u32
    }

    /// How many distinct keys have been assigned.
    pub fn num_keys(&self) -> usize {
        self.owners.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{partition, ChunkIndex};

    fn key(t: u32, c: u32) -> Key {
        Key::new(TensorId(t), ChunkIndex(c))
    }

    #[test]
    fn zero_servers_is_an_error() {
        assert_eq!(ServerAssigner::new(0).unwrap_err(), Error::NoServers);
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let mut a = ServerAssigner::new(3).unwrap();
        assert_eq!(a.assign(key(0, 0), 10), ServerIndex(0));
        assert_eq!(a.assign(key(0, 1), 10), ServerIndex(1));
        assert_eq!(a.assign(key(0, 2), 10), ServerIndex(2));
        assert_eq!(a.assign(key(0, 3), 10), ServerIndex(0));
        assert_eq!(a.num_servers(), 3);
    }

    #[test]
    fn balances_bytes_not_counts() {
        let mut a = ServerAssigner::new(2).unwrap();
        assert_eq!(a.assign(key(0, 0), 1000), ServerIndex(0));
        for c in 1..=10 {
            assert_eq!(a.assign(key(0, c), 100), ServerIndex(1));
        }
        // 1000 against 1000: a tie, so the lowest index.
        assert_eq!(a.assign(key(0, 11), 100), ServerIndex(0));
        assert_eq!(a.loads(), [1100, 1000]);
    }

    #[test]
    fn repeated_key_keeps_its_server() {
        let mut a = ServerAssigner::new(2).unwrap();
        assert_eq!(a.assign(key(1, 0), 50), ServerIndex(0));
        assert_eq!(a.assign(key(1, 0), 50), ServerIndex(0));
        assert_eq!(a.loads(), [50, 0]);
        assert_eq!(a.server_of(key(1, 0)), Some(ServerIndex(0)));
        assert_eq!(a.server_of(key(1, 1)), None);
        assert_eq!(a.num_keys(), 1);
    }

    #[test]
    fn assign_tensor_gives_one_server_per_chunk() {
        let mut a = ServerAssigner::new(4).unwrap();
        let chunks = partition(10 * 1024, 4, 1024).unwrap();
        let servers = a.assign_tensor(TensorId(7), &chunks);
        assert_eq!(servers.len(), chunks.len());
        for (c, s) in chunks.iter().zip(&servers) {
            assert_eq!(a.server_of(Key::new(TensorId(7), c.index)), Some(*s));
        }
        assert_eq!(a.loads(), [3072, 3072, 2048, 2048]);
    }

    #[test]
    fn single_server_takes_everything() {
        let mut a = ServerAssigner::new(1).unwrap();
        for c in 0..5 {
            assert_eq!(a.assign(key(0, c), 7), ServerIndex(0));
        }
        assert_eq!(a.loads(), [35]);
    }
}
