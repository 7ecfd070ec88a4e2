//! The KV connector: whole cache blocks handed between engines (prefill/decode
//! disaggregation).
//!
//! The engine does not move bytes itself. It names the blocks and holds them still while an
//! agent outside (NIXL, in `supernode worker`) copies them by address ([`KvRegion`]s):
//!
//! - **Export** (the prefill side): [`KvOp::Pin`] takes one reference to each cached full block
//!   of a prompt's chain, so that none is evicted or rewritten while a peer reads it, until
//!   [`KvOp::Release`].
//! - **Import** (the decode side): [`KvOp::Reserve`] takes the blocks of a prompt's chain that
//!   this engine already caches, and fresh blocks for the rest, which no request can see yet.
//!   The agent writes the peer's blocks into the fresh ones; [`KvOp::Commit`] then registers
//!   them in the prefix cache under the chain's hashes, exactly as if this engine had computed
//!   them. The request is then submitted as usual and its prefix lookup finds the blocks: the
//!   scheduler, preemption and batching see nothing new. A transfer that fails is
//!   [`KvOp::Release`]d uncommitted, and the request computes its prompt itself.
//!
//! Both sides hash the chain as the scheduler does (the deployment salt and the request's
//! `cache_salt` at its root), so two engines agree on a block only where its whole prefix is the
//! same. The last token of a prompt is never imported (the scheduler always computes it, to
//! have its logits). Models without prefix caching (recurrent state) cannot import.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::block_pool::{block_hash, Blocks, BLOCK_SIZE};
use super::Engine;

pub use supernode_models::KvRegion;

/// A set of blocks the connector holds for someone outside the engine.
pub type LeaseId = u64;

/// The cached full blocks of a prompt's chain, in order, held until released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedPrefix {
    pub lease: LeaseId,
    pub blocks: Vec<u32>,
}

/// Blocks for the first `cached + fill.len()` full blocks of a prompt: the first `cached`
/// were in this engine's prefix cache already, `fill` are fresh blocks for the rest, in chain
/// order, to be written and then committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub lease: LeaseId,
    pub cached: usize,
    pub fill: Vec<u32>,
}

/// One request to the connector, answered (where it answers) through its reply.
pub enum KvOp {
    Pin {
        tokens: Vec<u32>,
        cache_salt: Option<String>,
        reply: Box<dyn FnOnce(PinnedPrefix) + Send>,
    },
    Reserve {
        tokens: Vec<u32>,
        cache_salt: Option<String>,
        /// The most blocks wanted (what the peer has).
        max_blocks: usize,
        reply: Box<dyn FnOnce(Reservation) + Send>,
    },
    /// The first `filled` fresh blocks of the reservation hold the peer's rows now.
    Commit { lease: LeaseId, filled: usize },
    /// Gives a lease's blocks back (unknown leases are ignored).
    Release { lease: LeaseId },
}

/// What a lease holds.
pub(super) struct Lease {
    blocks: Blocks,
    /// The chain's tokens (full blocks only) and salt, to register a reservation's blocks.
    tokens: Vec<u32>,
    cache_salt: Option<String>,
    /// Blocks found cached (a reservation's fresh blocks follow them).
    cached: usize,
}

/// The connector's leases.
#[derive(Default)]
pub(super) struct Leases {
    held: HashMap<LeaseId, Lease>,
    next: LeaseId,
}

impl Engine {
    /// Carries out `op`.
    pub fn kv_op(&mut self, op: KvOp) {
        match op {
            KvOp::Pin {
                tokens,
                cache_salt,
                reply,
            } => {
                let full = tokens.len() / BLOCK_SIZE;
                let (table, _) = self.take_cached(&tokens[..full * BLOCK_SIZE], &cache_salt);
                let blocks = table.ids().to_vec();
                self.stats
                    .kv_exported_blocks
                    .fetch_add(blocks.len() as u64, Ordering::Relaxed);
                let lease = self.hold(table, Vec::new(), None, 0);
                reply(PinnedPrefix { lease, blocks });
            }
            KvOp::Reserve {
                tokens,
                cache_salt,
                max_blocks,
                reply,
            } => {
                // As the scheduler's prefix match: the last token is always computed.
                let n = (tokens.len().saturating_sub(1) / BLOCK_SIZE).min(max_blocks);
                let chain = tokens[..n * BLOCK_SIZE].to_vec();
                let (mut table, cached) = self.take_cached(&chain, &cache_salt);
                {
                    let mut pool = self.sched.pool();
                    while table.len() < n {
                        match pool.allocate() {
                            Some(b) => table.push_owned(b),
                            None => break,
                        }
                    }
                }
                let fill = table.ids()[cached..].to_vec();
                let lease = self.hold(table, chain, cache_salt, cached);
                reply(Reservation {
                    lease,
                    cached,
                    fill,
                });
            }
            KvOp::Commit { lease, filled } => self.commit(lease, filled),
            KvOp::Release { lease } => {
                self.leases.held.remove(&lease);
            }
        }
        self.publish();
    }

    /// The cached blocks of `chain`'s full blocks from its start, with a reference each, and
    /// how many there are.
    fn take_cached(&mut self, chain: &[u32], cache_salt: &Option<String>) -> (Blocks, usize) {
        let mut table = self.sched.table();
        let mut parent = self.sched.root(cache_salt.as_deref());
        let mut pool = self.sched.pool();
        for toks in chain.chunks_exact(BLOCK_SIZE) {
            let h = block_hash(&parent, toks);
            match pool.lookup(&h, &parent, toks) {
                Some(b) => table.push_owned(b),
                None => break,
            }
            parent = h;
        }
        drop(pool);
        let n = table.len();
        (table, n)
    }

    fn hold(
        &mut self,
        blocks: Blocks,
        tokens: Vec<u32>,
        cache_salt: Option<String>,
        cached: usize,
    ) -> LeaseId {
        let l = &mut self.leases;
        l.next += 1;
        l.held.insert(
            l.next,
            Lease {
                blocks,
                tokens,
                cache_salt,
                cached,
            },
        );
        l.next
    }

    /// Registers the first `filled` fresh blocks of reservation `lease` in the prefix cache.
    fn commit(&mut self, lease: LeaseId, filled: usize) {
        let Some(l) = self.leases.held.get(&lease) else {
            return;
        };
        let end = (l.cached + filled).min(l.blocks.len());
        let mut parent = self.sched.root(l.cache_salt.as_deref());
        let mut pool = self.sched.pool();
        for (i, toks) in l.tokens.chunks_exact(BLOCK_SIZE).take(end).enumerate() {
            let h = block_hash(&parent, toks);
            if i >= l.cached {
                pool.register(
                    l.blocks.ids()[i],
                    h,
                    parent,
                    toks,
                    i == 0,
                    l.cache_salt.as_deref(),
                );
            }
            parent = h;
        }
        drop(pool);
        self.stats
            .kv_imported_blocks
            .fetch_add(end.saturating_sub(l.cached) as u64, Ordering::Relaxed);
    }

    /// Leases held now.
    pub fn num_leases(&self) -> usize {
        self.leases.held.len()
    }
}
