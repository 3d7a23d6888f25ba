//! A registration cache keyed by address range.
//!
//! Registering memory is expensive on RDMA (it pins pages) and cheap but not free elsewhere;
//! frameworks hand the same gradient buffers to every step. The cache remembers the token of
//! each `(address, length)` it registered and evicts the least recently used entry when it
//! holds more than its byte or entry limit. Evicted regions are deregistered by the caller,
//! which gets them back from [`RegistrationCache::insert`].

use std::collections::HashMap;

/// Least-recently-used map from `(address, length)` to a registered region token.
#[derive(Debug)]
pub struct RegistrationCache {
    map: HashMap<(usize, usize), Entry>,
    clock: u64,
    bytes: u64,
    max_bytes: u64,
    max_entries: usize,
    hits: u64,
    misses: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    token: u64,
    used: u64,
    pinned: u32,
}

impl RegistrationCache {
    /// A cache holding at most `max_entries` regions and `max_bytes` bytes.
    pub fn new(max_entries: usize, max_bytes: u64) -> Self {
        RegistrationCache {
            map: HashMap::new(),
            clock: 0,
            bytes: 0,
            max_bytes,
            max_entries: max_entries.max(1),
            hits: 0,
            misses: 0,
        }
    }

    /// The token registered for exactly this range, if any; marks it used and pins it (an
    /// operation is using it) until [`RegistrationCache::unpin`].
    pub fn lookup(&mut self, addr: usize, len: usize) -> Option<u64> {
        self.clock += 1;
        match self.map.get_mut(&(addr, len)) {
            Some(e) => {
                e.used = self.clock;
                e.pinned += 1;
                self.hits += 1;
                Some(e.token)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Remember a freshly registered range (pinned once, as after `lookup`). Returns the tokens
    /// evicted to stay within the limits; the caller deregisters them. Pinned entries are never
    /// evicted.
    pub fn insert(&mut self, addr: usize, len: usize, token: u64) -> Vec<u64> {
        self.clock += 1;
        if let Some(old) = self.map.insert(
            (addr, len),
            Entry {
                token,
                used: self.clock,
                pinned: 1,
            },
        ) {
            self.bytes -= len as u64;
            debug_assert_ne!(old.token, token);
        }
        self.bytes += len as u64;
        let mut evicted = Vec::new();
        while self.map.len() > self.max_entries || self.bytes > self.max_bytes {
            let victim = self
                .map
                .iter()
                .filter(|(_, e)| e.pinned == 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, e)| (*k, e.token));
            match victim {
                Some((k, t)) => {
                    self.map.remove(&k);
                    self.bytes -= k.1 as u64;
                    evicted.push(t);
                }
                None => break,
            }
        }
        evicted
    }

    /// An operation stopped using the range.
    pub fn unpin(&mut self, addr: usize, len: usize) {
        if let Some(e) = self.map.get_mut(&(addr, len)) {
            e.pinned = e.pinned.saturating_sub(1);
        }
    }

    /// Forget the range (e.g. after its memory was revoked); returns its token.
    pub fn remove(&mut self, addr: usize, len: usize) -> Option<u64> {
        let e = self.map.remove(&(addr, len))?;
        self.bytes -= len as u64;
        Some(e.token)
    }

    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits
    }
    /// Lookups that needed a registration.
    pub fn misses(&self) -> u64 {
        self.misses
    }
    /// Regions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_after_insert_and_lru_eviction() {
        let mut c = RegistrationCache::new(2, u64::MAX);
        assert_eq!(c.lookup(100, 10), None);
        assert!(c.insert(100, 10, 1).is_empty());
        c.unpin(100, 10);
        assert_eq!(c.lookup(100, 10), Some(1));
        c.unpin(100, 10);
        assert!(c.insert(200, 10, 2).is_empty());
        c.unpin(200, 10);
        // 100 was used before 200 was inserted: it is the LRU victim.
        assert_eq!(c.insert(300, 10, 3), vec![1]);
        assert_eq!(c.lookup(100, 10), None);
        assert_eq!((c.hits(), c.misses()), (1, 2));
    }

    #[test]
    fn pinned_entries_survive_and_bytes_bound() {
        let mut c = RegistrationCache::new(10, 25);
        c.insert(0, 10, 1); // pinned
        c.insert(10, 10, 2);
        c.unpin(10, 10);
        // over 25 bytes: the unpinned one goes, the pinned one stays
        assert_eq!(c.insert(20, 10, 3), vec![2]);
        assert_eq!(c.remove(0, 10), Some(1));
        assert_eq!(c.len(), 1);
    }
}
