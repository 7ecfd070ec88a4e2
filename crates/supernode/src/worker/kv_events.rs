//! The engine's prefix-cache events as Dynamo KV events, and its load as Dynamo's per-worker
//! snapshot, for the KV-aware router.
//!
//! The engine reports each full block it makes reusable (with its parent and tokens) and each
//! cached block it evicts ([`BlockEvent`]). Dynamo's router keeps a radix tree per worker from
//! such events: a block's `block_hash` names it (here the first 8 bytes of supernode's SHA-256
//! chain hash, little-endian), `parent_hash` links it, and `tokens_hash` is Dynamo's own hash of
//! the block's tokens (`compute_block_hash_for_seq`, seeded with the request's `cache_salt` as
//! the router seeds it with the request's `cache_namespace`), which the router computes the same
//! way for each incoming prompt and walks the tree with. Blocks are 16 tokens on both sides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dynamo_backend_common::{ComponentSnapshot, KvEventPublisher, KvEventSource};
use dynamo_llm::kv_router::protocols::{
    compute_block_hash_for_seq, BlockHashOptions, ExternalSequenceBlockHash, KvCacheEvent,
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
};
use supernode_engine::engine::block_pool::{BlockEvent, BlockHash};
use supernode_engine::engine::{EngineHandle, BLOCK_SIZE};

/// Dynamo's name for a supernode block hash.
pub fn external(h: &BlockHash) -> ExternalSequenceBlockHash {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.0[..8]);
    ExternalSequenceBlockHash(u64::from_le_bytes(b))
}

/// One engine block event as a Dynamo KV event numbered `event_id`.
pub fn to_dynamo(event: BlockEvent, event_id: u64) -> KvCacheEvent {
    let data = match event {
        BlockEvent::Stored {
            hash,
            parent,
            tokens,
            salt,
        } => {
            // The router seeds its hash of a salted request's blocks with the salt (Dynamo's
            // `cache_namespace`, which the worker takes as the engine's `cache_salt`).
            let options = BlockHashOptions {
                cache_namespace: salt.as_deref(),
                ..BlockHashOptions::default()
            };
            let tokens_hash = compute_block_hash_for_seq(&tokens, BLOCK_SIZE as u32, options)
                .into_iter()
                .next()
                .expect("a stored block is full");
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.as_ref().map(external),
                start_position: None,
                blocks: vec![KvCacheStoredBlockData {
                    block_hash: external(&hash),
                    tokens_hash,
                    mm_extra_info: None,
                }],
            })
        }
        BlockEvent::Removed { hash } => KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: vec![external(&hash)],
        }),
    };
    KvCacheEvent {
        event_id,
        data,
        dp_rank: 0,
    }
}

/// The push source Dynamo's `Worker` builds a publisher for: from then on the engine's block
/// events, batch by batch after each step, go to the router.
pub fn source(handle: &Arc<EngineHandle>) -> KvEventSource {
    let handle = handle.clone();
    KvEventSource::Push {
        dp_rank: 0,
        on_ready: Box::new(move |publisher: Arc<KvEventPublisher>| {
            let mut next_id = 0u64;
            let mut warned = false;
            handle.send_block_events(Box::new(move |events| {
                let batch: Vec<KvCacheEvent> = events
                    .into_iter()
                    .map(|e| {
                        next_id += 1;
                        to_dynamo(e, next_id)
                    })
                    .collect();
                if publisher.publish_batch(batch).is_err() && !warned {
                    warned = true;
                    tracing::warn!("the KV event publisher is closed; KV events are dropped");
                }
            }));
            Ok(())
        }),
    }
}

/// Publishes the engine's KV usage to Dynamo (the router's load signal and the
/// `dynamo_component_*` gauges) every 100 ms until `stopped`.
pub fn publish_load(
    handle: Arc<EngineHandle>,
    publisher: Arc<dynamo_backend_common::SnapshotPublisher>,
    stopped: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new()
        .name("supernode-load".into())
        .spawn(move || {
            let st = handle.stats().clone();
            while !stopped.load(Ordering::Relaxed) {
                let used = st.blocks_in_use.load(Ordering::Relaxed) as u64;
                let total = st.blocks_total.load(Ordering::Relaxed).max(1) as u64;
                let queries = st.prefix_query_tokens.load(Ordering::Relaxed);
                let hits = st.prefix_hit_tokens.load(Ordering::Relaxed);
                publisher.publish(
                    0,
                    ComponentSnapshot {
                        kv_used_blocks: used,
                        kv_total_blocks: total,
                        gpu_cache_usage: used as f32 / total as f32,
                        kv_cache_hit_rate: (queries > 0).then(|| hits as f32 / queries as f32),
                        dp_rank: 0,
                    },
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the load publisher: {e}");
    }
}
