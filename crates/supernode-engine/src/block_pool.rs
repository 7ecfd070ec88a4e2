//! The KV block pool: reference-counted cache blocks and the prefix cache over full blocks.
//!
//! Every block of the [`supernode_models::KvCache`] is owned here. A running sequence holds a
//! reference to each block of its block table; [`BlockPool::free`] drops one, and a block whose
//! count reaches zero is free again. A block filled with known tokens can be *registered* under
//! the hash of its tokens and of everything before it (a hash chain, as vLLM does), so that a
//! later sequence starting with the same tokens takes the block instead of recomputing it.
//!
//! Free blocks come in two kinds: plain ones, and registered ones whose contents are still
//! valid. Allocation takes plain blocks first, then evicts the least recently freed registered
//! block; a prefix-cache hit on a free registered block revives it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// The hash of a full block: its tokens and the hash of the block before it.
pub type BlockHash = u64;

/// Hash of a block holding `tokens` after the block whose hash is `parent` (0 for the first).
pub fn block_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Reference counts, free lists and the prefix-cache index of `num_blocks` blocks.
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    /// Free blocks with no registered contents.
    plain: Vec<u32>,
    /// Free registered blocks, least recently freed first; entries whose stamp is stale were
    /// revived or evicted since.
    lru: VecDeque<(u32, u64)>,
    stamp: Vec<u64>,
    next_stamp: u64,
    /// The registration of each block, if any: its hash.
    hash_of: Vec<Option<BlockHash>>,
    index: HashMap<BlockHash, u32>,
    num_free: usize,
    prefix_caching: bool,
}

impl BlockPool {
    pub fn new(num_blocks: usize, prefix_caching: bool) -> BlockPool {
        BlockPool {
            refs: vec![0; num_blocks],
            // Popped from the back: block 0 is handed out first.
            plain: (0..num_blocks as u32).rev().collect(),
            lru: VecDeque::new(),
            stamp: vec![0; num_blocks],
            next_stamp: 1,
            hash_of: vec![None; num_blocks],
            index: HashMap::new(),
            num_free: num_blocks,
            prefix_caching,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that [`BlockPool::allocate`] can still hand out (plain and evictable).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_in_use(&self) -> usize {
        self.refs.len() - self.num_free
    }

    /// Registered blocks (in use or evictable).
    pub fn num_cached(&self) -> usize {
        self.index.len()
    }

    /// A free block with one reference, or `None` if every block is in use. Evicts the least
    /// recently freed registered block when no plain one is left.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.plain.pop() {
            Some(b) => b,
            None => loop {
                let (b, stamp) = self.lru.pop_front()?;
                if self.refs[b as usize] == 0 && self.stamp[b as usize] == stamp {
                    self.unregister(b);
                    break b;
                }
            },
        };
        debug_assert_eq!(self.refs[block as usize], 0);
        self.refs[block as usize] = 1;
        self.num_free -= 1;
        Some(block)
    }

    /// Drops one reference to `block`.
    pub fn free(&mut self, block: u32) {
        let b = block as usize;
        assert!(
            self.refs[b] > 0,
            "block {block} freed more often than taken"
        );
        self.refs[b] -= 1;
        if self.refs[b] == 0 {
            self.num_free += 1;
            if self.hash_of[b].is_some() {
                self.stamp[b] = self.next_stamp;
                self.next_stamp += 1;
                self.lru.push_back((block, self.stamp[b]));
            } else {
                self.plain.push(block);
            }
        }
        // Stale LRU entries pile up when blocks are revived; drop them now and then.
        if self.lru.len() > 2 * self.refs.len() + 16 {
            let (refs, stamp) = (&self.refs, &self.stamp);
            self.lru
                .retain(|&(b, s)| refs[b as usize] == 0 && stamp[b as usize] == s);
        }
    }

    /// The registered block with hash `hash`, with one more reference (revived if it was free).
    pub fn lookup(&mut self, hash: BlockHash) -> Option<u32> {
        if !self.prefix_caching {
            return None;
        }
        let block = *self.index.get(&hash)?;
        let b = block as usize;
        if self.refs[b] == 0 {
            self.num_free -= 1;
            // Its LRU entry goes stale.
            self.stamp[b] = 0;
        }
        self.refs[b] += 1;
        Some(block)
    }

    /// Registers the full block `block` under `hash`, unless another block already holds the
    /// same contents (that one stays the cached copy).
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if !self.prefix_caching || self.hash_of[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(hash) {
            e.insert(block);
            self.hash_of[block as usize] = Some(hash);
        }
    }

    fn unregister(&mut self, block: u32) {
        if let Some(h) = self.hash_of[block as usize].take() {
            if self.index.get(&h) == Some(&block) {
                self.index.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_free() {
        let mut pool = BlockPool::new(3, true);
        let a: Vec<u32> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_in_use(), 3);
        pool.free(1);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.allocate(), Some(1));
    }

    #[test]
    fn shared_block_is_freed_by_its_last_owner() {
        let mut pool = BlockPool::new(2, true);
        let b = pool.allocate().unwrap();
        let h = block_hash(0, &[1, 2, 3]);
        pool.register(b, h);
        assert_eq!(pool.lookup(h), Some(b));
        pool.free(b);
        assert_eq!(pool.num_in_use(), 1);
        pool.free(b);
        assert_eq!(pool.num_in_use(), 0);
        // Still cached while free: a lookup revives it.
        assert_eq!(pool.lookup(h), Some(b));
        assert_eq!(pool.num_in_use(), 1);
    }

    #[test]
    fn plain_blocks_go_before_cached_ones_and_eviction_is_lru() {
        let mut pool = BlockPool::new(3, true);
        let (a, b, c) = (
            pool.allocate().unwrap(),
            pool.allocate().unwrap(),
            pool.allocate().unwrap(),
        );
        pool.register(a, 10);
        pool.register(b, 20);
        pool.free(b);
        pool.free(a);
        pool.free(c);
        // The plain block first, then the least recently freed registered one (b).
        assert_eq!(pool.allocate(), Some(c));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(20), None);
        assert_eq!(pool.lookup(10), Some(a));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn a_revived_block_is_not_evicted_from_under_its_owner() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        pool.register(a, 7);
        pool.free(a);
        assert_eq!(pool.lookup(7), Some(a));
        let other = pool.allocate().unwrap();
        assert_ne!(other, a);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.lookup(7), Some(a));
    }

    #[test]
    fn duplicate_contents_keep_the_first_copy() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.register(a, 5);
        pool.register(b, 5);
        pool.free(b);
        pool.free(a);
        assert_eq!(pool.num_cached(), 1);
        assert_eq!(pool.lookup(5), Some(a));
    }

    #[test]
    fn without_prefix_caching_nothing_is_found() {
        let mut pool = BlockPool::new(1, false);
        let a = pool.allocate().unwrap();
        pool.register(a, 1);
        pool.free(a);
        assert_eq!(pool.lookup(1), None);
        assert_eq!(pool.allocate(), Some(a));
    }

    #[test]
    fn hashes_chain() {
        assert_ne!(block_hash(0, &[1, 2]), block_hash(1, &[1, 2]));
        assert_ne!(block_hash(0, &[1, 2]), block_hash(0, &[2, 1]));
        assert_eq!(block_hash(3, &[1, 2]), block_hash(3, &[1, 2]));
    }
}
