//! The prefix cache's block events, which `supernode worker` publishes to Dynamo's KV-aware
//! router: every full block stored once, chained to its parent by the documented hashes, and
//! every evicted one removed once, so a follower of the events knows exactly which prefixes the
//! engine can reuse.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use supernode_engine::engine::block_pool::{block_hash, root_hash, BlockEvent, BlockHash};
use supernode_engine::engine::BLOCK_SIZE;

mod common;
use common::{drive, engine, greedy, ids};

fn take(log: &Arc<Mutex<Vec<BlockEvent>>>) -> Vec<BlockEvent> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// The hashes of the full blocks of `tokens`, chained from the unsalted root.
fn chain(tokens: &[u32]) -> Vec<BlockHash> {
    let mut parent = root_hash("", "");
    tokens
        .chunks_exact(BLOCK_SIZE)
        .map(|b| {
            parent = block_hash(&parent, b);
            parent
        })
        .collect()
}

#[test]
fn block_events_follow_the_prefix_cache() {
    // 12 blocks of 16 tokens.
    let mut e = engine("llama", 4, 64, 12);
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    e.send_block_events(Box::new(move |ev| l.lock().unwrap().extend(ev)));

    // 40 prompt tokens and 9 generated: 48 computed (the last token is not), 3 full blocks.
    let a: Vec<u32> = (0..40).map(|i| (i * 7 % 200) + 3).collect();
    let heard = drive(&mut e, std::slice::from_ref(&a), |p, sink| {
        greedy(p.clone(), 9, sink)
    });
    let seq: Vec<u32> = a.iter().copied().chain(ids(&heard[0])).collect();
    let hashes = chain(&seq[..48]);
    let stored = take(&log);
    let want: Vec<BlockEvent> = (0..3)
        .map(|b| BlockEvent::Stored {
            hash: hashes[b],
            parent: b.checked_sub(1).map(|p| hashes[p]),
            tokens: seq[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].to_vec(),
            salt: None,
        })
        .collect();
    assert_eq!(stored, want);

    // The same prompt again reuses the cached blocks: nothing new is stored.
    drive(&mut e, std::slice::from_ref(&a), |p, sink| {
        greedy(p.clone(), 9, sink)
    });
    assert_eq!(take(&log), Vec::new());

    // Two long prompts need more blocks than are free: the cached ones are evicted, each
    // announced once, after it was stored.
    let others: Vec<Vec<u32>> = (0..2)
        .map(|k| (0..150).map(|i| ((i * 13 + k * 101) % 250) + 3).collect())
        .collect();
    drive(&mut e, &others, |p, sink| greedy(p.clone(), 4, sink));
    let events = take(&log);
    let mut live: HashSet<BlockHash> = hashes.iter().copied().collect();
    let mut removed = Vec::new();
    for ev in &events {
        match ev {
            BlockEvent::Stored { hash, parent, .. } => {
                if let Some(p) = parent {
                    assert!(
                        live.contains(p),
                        "a block stored after its parent was removed"
                    );
                }
                assert!(live.insert(*hash), "a block stored twice");
            }
            BlockEvent::Removed { hash } => {
                assert!(live.remove(hash), "a block removed that was not stored");
                removed.push(*hash);
            }
        }
    }
    assert!(
        hashes.iter().all(|h| removed.contains(h)),
        "the first prompt's blocks were evicted and announced: {removed:?}"
    );
    // What the events leave stored is what the pool still caches.
    assert_eq!(
        live.len(),
        e.stats()
            .blocks_cached
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// A salted request's blocks are announced with its salt, chained from the salted root (a
/// router that seeds its hashes with the salt can then match them; an unsalted prompt with the
/// same tokens cannot).
#[test]
fn salted_blocks_are_announced_with_their_salt() {
    let mut e = engine("llama", 4, 64, 12);
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    e.send_block_events(Box::new(move |ev| l.lock().unwrap().extend(ev)));
    let a: Vec<u32> = (0..40).map(|i| (i * 5 % 200) + 3).collect();
    drive(&mut e, std::slice::from_ref(&a), |p, sink| {
        let mut r = greedy(p.clone(), 1, sink);
        r.cache_salt = Some("tenant-7".into());
        r
    });
    let root = root_hash("", "tenant-7");
    let first = block_hash(&root, &a[..BLOCK_SIZE]);
    let second = block_hash(&first, &a[BLOCK_SIZE..2 * BLOCK_SIZE]);
    assert_eq!(
        take(&log),
        vec![
            BlockEvent::Stored {
                hash: first,
                parent: None,
                tokens: a[..BLOCK_SIZE].to_vec(),
                salt: Some("tenant-7".into()),
            },
            BlockEvent::Stored {
                hash: second,
                parent: Some(first),
                tokens: a[BLOCK_SIZE..2 * BLOCK_SIZE].to_vec(),
                salt: Some("tenant-7".into()),
            },
        ]
    );
}
