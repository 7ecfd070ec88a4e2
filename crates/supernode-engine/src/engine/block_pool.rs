//! The KV block pool: reference-counted cache blocks, the guard that returns them, and the
//! prefix cache over full blocks.
//!
//! The design follows nano-vllm's block manager and mistral.rs's block pool: pure bookkeeping
//! that never touches a tensor. Every block of the [`supernode_models::KvCache`] is counted
//! here. A running sequence owns a [`Blocks`] guard holding one reference to each block of its
//! block table; dropping the guard (a finished, cancelled or preempted sequence) returns them,
//! **tail first**, so that the least recently used order evicts the end of a cached chain
//! before its start and the longest shared prefix survives longest.
//!
//! **Prefix cache.** A block filled with known tokens is *registered* under the hash of its
//! tokens and of everything before it (a hash chain, as vLLM does). The hash is SHA-256
//! ([`block_hash`]): specified, stable across processes and releases (a router or a decode
//! worker can compute it), and collision-resistant, so a crafted prompt cannot aim for another
//! tenant's block (vLLM moved to SHA-256 after CVE-2025-25183). The chain starts from a root
//! ([`root_hash`]) keyed by an optional per-deployment salt and an optional per-request
//! `cache_salt`: requests with different salts share nothing. A hit is still checked against
//! the block's parent hash and tokens, so even a collision is never trusted.
//!
//! Costs: allocate, free, register and lookup are O(1) amortised (a hash map and a lazily
//! cleaned LRU queue). Free blocks come in two kinds: plain ones, and registered ones whose
//! contents are still valid. Allocation takes plain blocks first, then evicts the least
//! recently freed registered block; a hit on a free registered block revives it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// KV slots per cache block.
pub const BLOCK_SIZE: usize = 16;

/// The SHA-256 of a full block: the hash of the block before it (or the root) and its tokens.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The parent of a chain's first block: SHA-256 of `supernode/prefix-cache/v1`, then the
/// deployment salt and the request's `cache_salt`, each as its UTF-8 length (u64 little-endian)
/// and bytes. No salt and an empty salt are the same.
pub fn root_hash(deployment_salt: &str, cache_salt: &str) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"supernode/prefix-cache/v1");
    for s in [deployment_salt, cache_salt] {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    BlockHash(h.finalize().into())
}

/// SHA-256 of the parent's 32 bytes followed by each token id as u32 little-endian.
pub fn block_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.0);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    BlockHash(h.finalize().into())
}

/// A change to the prefix cache, for routers that follow which worker holds which prefix
/// (Dynamo's KV-aware router, from the events a worker publishes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockEvent {
    /// A full block of `tokens` became reusable under `hash`; `parent` is the block before it
    /// in its chain, `None` for a chain's first block; `salt` the request's `cache_salt`, if it
    /// had one (a router that salts its own hashes the same way needs it).
    Stored {
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: Vec<u32>,
        salt: Option<String>,
    },
    /// The block registered under `hash` was evicted: its prefix is no longer cached.
    Removed { hash: BlockHash },
}

/// What a registered block holds, checked on every hit.
#[derive(Debug)]
struct Registration {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Vec<u32>,
}

/// Reference counts, free lists and the prefix-cache index of `num_blocks` blocks.
#[derive(Debug)]
pub struct BlockPool {
    /// References to each block; 0 means free.
    refs: Vec<u32>,
    /// Free blocks with no registered contents, popped from the back.
    plain: Vec<u32>,
    /// Free registered blocks, least recently freed first; entries whose stamp is stale were
    /// revived or evicted since.
    lru: VecDeque<(u32, u64)>,
    /// The stamp of each block's live LRU entry (0: none).
    stamp: Vec<u64>,
    next_stamp: u64,
    /// The registration of each block, if any.
    reg: Vec<Option<Registration>>,
    /// Registered blocks by hash.
    index: HashMap<BlockHash, u32>,
    num_free: usize,
    prefix_caching: bool,
    /// Hits refused because the block's parent or tokens differed from the request's.
    refused_hits: u64,
    /// Registrations and evictions since the last [`BlockPool::take_events`], when logged.
    events: Option<Vec<BlockEvent>>,
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
            reg: (0..num_blocks).map(|_| None).collect(),
            index: HashMap::new(),
            num_free: num_blocks,
            prefix_caching,
            refused_hits: 0,
            events: None,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Whether blocks are cached and found by their contents.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
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

    /// Lookups whose hash matched but whose parent or tokens did not.
    pub fn refused_hits(&self) -> u64 {
        self.refused_hits
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
            if self.reg[b].is_some() {
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

    /// The registered block with hash `hash`, with one more reference (revived if it was
    /// free), if its parent and tokens are `parent` and `tokens`.
    pub fn lookup(&mut self, hash: &BlockHash, parent: &BlockHash, tokens: &[u32]) -> Option<u32> {
        if !self.prefix_caching {
            return None;
        }
        let block = *self.index.get(hash)?;
        let b = block as usize;
        let reg = self.reg[b].as_ref().expect("indexed blocks are registered");
        if reg.parent != *parent || reg.tokens != tokens {
            self.refused_hits += 1;
            return None;
        }
        if self.refs[b] == 0 {
            self.num_free -= 1;
            // Its LRU entry goes stale.
            self.stamp[b] = 0;
        }
        self.refs[b] += 1;
        Some(block)
    }

    /// Starts keeping a log of [`BlockEvent`]s.
    pub fn log_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events logged since the last call (none unless [`BlockPool::log_events`] was called).
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Registers the full block `block`, holding `tokens` after the block hashed `parent` (the
    /// chain's root when `first`), under `hash`, unless another block already holds the same
    /// contents (that one stays the cached copy). `salt` is the request's `cache_salt`, for the
    /// event.
    pub fn register(
        &mut self,
        block: u32,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[u32],
        first: bool,
        salt: Option<&str>,
    ) {
        if !self.prefix_caching || self.reg[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(hash) {
            e.insert(block);
            if let Some(log) = &mut self.events {
                log.push(BlockEvent::Stored {
                    hash,
                    parent: (!first).then_some(parent),
                    tokens: tokens.to_vec(),
                    salt: salt.map(str::to_string),
                });
            }
            self.reg[block as usize] = Some(Registration {
                hash,
                parent,
                tokens: tokens.to_vec(),
            });
        }
    }

    fn unregister(&mut self, block: u32) {
        if let Some(r) = self.reg[block as usize].take() {
            if self.index.get(&r.hash) == Some(&block) {
                self.index.remove(&r.hash);
                if let Some(log) = &mut self.events {
                    log.push(BlockEvent::Removed { hash: r.hash });
                }
            }
        }
    }
}

/// A pool shared by the scheduler and the [`Blocks`] guards it hands out. Only the engine
/// thread touches it; the lock is never contended.
#[derive(Clone, Debug)]
pub struct SharedPool(Arc<Mutex<BlockPool>>);

impl SharedPool {
    pub fn new(pool: BlockPool) -> SharedPool {
        SharedPool(Arc::new(Mutex::new(pool)))
    }

    /// The pool, for bookkeeping. A panic while it was held leaves it consistent (every
    /// method finishes its update before it can panic), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, BlockPool> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty block table drawing on this pool.
    pub fn table(&self) -> Blocks {
        Blocks {
            ids: Vec::new(),
            pool: self.clone(),
        }
    }
}

/// A sequence's block table: one reference to each block, returned to the pool tail first
/// when the guard is dropped or cleared.
#[derive(Debug)]
pub struct Blocks {
    ids: Vec<u32>,
    pool: SharedPool,
}

impl Blocks {
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Takes blocks until the table covers `tokens` slots; `false` if the pool ran dry (the
    /// blocks taken so far stay in the table).
    pub fn grow_to(&mut self, tokens: usize) -> bool {
        let mut pool = self.pool.lock();
        while self.ids.len() * BLOCK_SIZE < tokens {
            match pool.allocate() {
                Some(b) => self.ids.push(b),
                None => return false,
            }
        }
        true
    }

    /// Returns the blocks past those that cover `tokens` slots, tail first (the slots of
    /// rejected draft tokens).
    pub fn shrink_to(&mut self, tokens: usize) {
        let keep = tokens.div_ceil(BLOCK_SIZE);
        if self.ids.len() <= keep {
            return;
        }
        let mut pool = self.pool.lock();
        while self.ids.len() > keep {
            if let Some(b) = self.ids.pop() {
                pool.free(b);
            }
        }
    }

    /// Appends a block the caller already holds a reference to (a prefix-cache hit).
    pub fn push_owned(&mut self, block: u32) {
        self.ids.push(block);
    }

    /// Returns every block, tail first.
    pub fn clear(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut pool = self.pool.lock();
        while let Some(b) = self.ids.pop() {
            pool.free(b);
        }
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> BlockHash {
        BlockHash([n; 32])
    }

    const ROOT: BlockHash = BlockHash([0; 32]);

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
        let hash = block_hash(&ROOT, &[1, 2, 3]);
        pool.register(b, hash, ROOT, &[1, 2, 3], true, None);
        assert_eq!(pool.lookup(&hash, &ROOT, &[1, 2, 3]), Some(b));
        pool.free(b);
        assert_eq!(pool.num_in_use(), 1);
        pool.free(b);
        assert_eq!(pool.num_in_use(), 0);
        // Still cached while free: a lookup revives it.
        assert_eq!(pool.lookup(&hash, &ROOT, &[1, 2, 3]), Some(b));
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
        pool.register(a, h(10), ROOT, &[], true, None);
        pool.register(b, h(20), ROOT, &[], true, None);
        pool.free(b);
        pool.free(a);
        pool.free(c);
        // The plain block first, then the least recently freed registered one (b).
        assert_eq!(pool.allocate(), Some(c));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(&h(20), &ROOT, &[]), None);
        assert_eq!(pool.lookup(&h(10), &ROOT, &[]), Some(a));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn a_revived_block_is_not_evicted_from_under_its_owner() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        pool.register(a, h(7), ROOT, &[], true, None);
        pool.free(a);
        assert_eq!(pool.lookup(&h(7), &ROOT, &[]), Some(a));
        let other = pool.allocate().unwrap();
        assert_ne!(other, a);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.lookup(&h(7), &ROOT, &[]), Some(a));
    }

    #[test]
    fn duplicate_contents_keep_the_first_copy() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.register(a, h(5), ROOT, &[], true, None);
        pool.register(b, h(5), ROOT, &[], true, None);
        pool.free(b);
        pool.free(a);
        assert_eq!(pool.num_cached(), 1);
        assert_eq!(pool.lookup(&h(5), &ROOT, &[]), Some(a));
    }

    #[test]
    fn without_prefix_caching_nothing_is_found() {
        let mut pool = BlockPool::new(1, false);
        let a = pool.allocate().unwrap();
        pool.register(a, h(1), ROOT, &[], true, None);
        pool.free(a);
        assert_eq!(pool.lookup(&h(1), &ROOT, &[]), None);
        assert_eq!(pool.allocate(), Some(a));
    }

    /// A hash that matches while the block's tokens or parent differ (a collision, or a forged
    /// hash) is refused, and counted.
    #[test]
    fn a_hit_whose_tokens_differ_is_refused() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        let hash = block_hash(&ROOT, &[1, 2]);
        pool.register(a, hash, ROOT, &[1, 2], true, None);
        pool.free(a);
        assert_eq!(pool.lookup(&hash, &ROOT, &[1, 3]), None);
        assert_eq!(pool.lookup(&hash, &h(9), &[1, 2]), None);
        assert_eq!(pool.refused_hits(), 2);
        assert_eq!(pool.num_in_use(), 0);
        assert_eq!(pool.lookup(&hash, &ROOT, &[1, 2]), Some(a));
    }

    #[test]
    fn a_guard_returns_its_blocks_tail_first() {
        let shared = SharedPool::new(BlockPool::new(4, true));
        let mut t = shared.table();
        assert!(t.grow_to(3 * BLOCK_SIZE));
        assert_eq!(t.ids(), &[0, 1, 2]);
        {
            let mut pool = shared.lock();
            for (i, &b) in t.ids().iter().enumerate() {
                pool.register(b, h(i as u8 + 1), ROOT, &[], true, None);
            }
        }
        drop(t);
        let mut pool = shared.lock();
        assert_eq!(pool.num_in_use(), 0);
        // Plain block 3 first, then the chain's tail (2), then 1: its head (0) survives last.
        assert_eq!(pool.allocate(), Some(3));
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.lookup(&h(1), &ROOT, &[]), Some(0));
    }

    #[test]
    fn a_guard_that_runs_dry_keeps_what_it_took() {
        let shared = SharedPool::new(BlockPool::new(2, true));
        let mut t = shared.table();
        assert!(!t.grow_to(3 * BLOCK_SIZE));
        assert_eq!(t.len(), 2);
        t.clear();
        assert_eq!(shared.lock().num_free(), 2);
    }

    /// Fixed vectors, computed independently with Python's hashlib:
    ///
    /// ```text
    /// import hashlib, struct
    /// def root(d, c):
    ///     h = hashlib.sha256(); h.update(b"supernode/prefix-cache/v1")
    ///     for s in (d, c):
    ///         b = s.encode(); h.update(struct.pack("<Q", len(b))); h.update(b)
    ///     return h.digest()
    /// def blk(p, toks): return hashlib.sha256(p + b"".join(struct.pack("<I", t) for t in toks)).digest()
    /// ```
    #[test]
    fn shrinking_returns_only_the_blocks_past_the_slots_kept() {
        let pool = SharedPool::new(BlockPool::new(4, true));
        let mut t = pool.table();
        assert!(t.grow_to(3 * BLOCK_SIZE + 1));
        assert_eq!(t.ids(), &[0, 1, 2, 3]);
        t.shrink_to(2 * BLOCK_SIZE + 1);
        assert_eq!(t.ids(), &[0, 1, 2]);
        assert_eq!(pool.lock().num_free(), 1);
        t.shrink_to(3 * BLOCK_SIZE);
        assert_eq!(t.len(), 3);
        t.shrink_to(BLOCK_SIZE);
        assert_eq!(t.ids(), &[0]);
        assert_eq!(pool.lock().num_free(), 3);
    }

    #[test]
    fn block_hashes_match_fixed_vectors() {
        let root = root_hash("", "");
        assert_eq!(
            root.to_string(),
            "1913151cf330e09b9091a4eedfbffab8428fad477fb9877d541db8126a24b074"
        );
        assert_eq!(
            root_hash("acme", "").to_string(),
            "ed2dfe5b1884c5786f84d2864ba3443159077c53b85ce39889fdcf0b747eeba5"
        );
        assert_eq!(
            root_hash("", "tenant-a").to_string(),
            "482b44bb165f0477f01dfee61fe84f9a41d17489bd4cb8dcf46e5f1278a01910"
        );
        let toks: Vec<u32> = (0..32).collect();
        let b0 = block_hash(&root, &toks[..16]);
        assert_eq!(
            b0.to_string(),
            "81719b00ac59005f6029cbcb5169b63d678d1e4e99a8f4eda49383c6a7613f92"
        );
        assert_eq!(
            block_hash(&b0, &toks[16..]).to_string(),
            "85b3eae0523a85f9709a56d1f3d9dcd4accf64d9cfffc9c62a80e2c9be8d3566"
        );
    }

    #[test]
    fn hashes_chain() {
        let (a, b) = (root_hash("", ""), root_hash("x", ""));
        assert_ne!(block_hash(&a, &[1, 2]), block_hash(&b, &[1, 2]));
        assert_ne!(block_hash(&a, &[1, 2]), block_hash(&a, &[2, 1]));
        assert_eq!(block_hash(&a, &[1, 2]), block_hash(&a, &[1, 2]));
        // The two salts are not interchangeable.
        assert_ne!(root_hash("x", ""), root_hash("", "x"));
    }
}
