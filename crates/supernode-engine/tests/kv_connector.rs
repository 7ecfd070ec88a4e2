//! The KV connector (prefill/decode disaggregation): blocks one engine computed, copied by
//! address into another engine's reserved blocks and committed there, are used by that engine
//! exactly as if it had computed them. The copy here is a plain memory copy between two engines
//! in one process; `supernode worker` does the same with NIXL between two processes.

use std::sync::{Arc, Mutex};

use supernode_engine::engine::connector::{KvOp, KvRegion, PinnedPrefix, Reservation};
use supernode_engine::engine::{Engine, BLOCK_SIZE};

mod common;
use common::{drive, engine, greedy, Heard};

fn pin(e: &mut Engine, tokens: &[u32]) -> PinnedPrefix {
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    e.kv_op(KvOp::Pin {
        tokens: tokens.to_vec(),
        cache_salt: None,
        reply: Box::new(move |p| *g.lock().unwrap() = Some(p)),
    });
    let p = got.lock().unwrap().take();
    p.expect("the connector answers at once")
}

fn reserve(e: &mut Engine, tokens: &[u32], max_blocks: usize) -> Reservation {
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    e.kv_op(KvOp::Reserve {
        tokens: tokens.to_vec(),
        cache_salt: None,
        max_blocks,
        reply: Box::new(move |r| *g.lock().unwrap() = Some(r)),
    });
    let r = got.lock().unwrap().take();
    r.expect("the connector answers at once")
}

/// Copies block `from` of every region of `src` to block `to` of the same region of `dst`.
fn copy_block(src: &[KvRegion], from: u32, dst: &[KvRegion], to: u32) {
    assert_eq!(src.len(), dst.len());
    for (s, d) in src.iter().zip(dst) {
        assert_eq!(s.block_bytes, d.block_bytes);
        let n = s.block_bytes;
        // SAFETY: both blocks lie inside their regions (the ids come from the engines' pools
        // of `len / block_bytes` blocks); the source is pinned and the destination reserved, so
        // neither engine touches them, and the engines are not stepping meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (s.addr + from as usize * n) as *const u8,
                (d.addr + to as usize * n) as *mut u8,
                n,
            );
        }
    }
}

/// A greedy request reporting each token's log-probability, so that outputs compare on the
/// logits themselves and not only on the argmax.
fn run(e: &mut Engine, prompt: &[u32], n: usize) -> Vec<(u32, f32)> {
    let heard: Vec<Heard> = drive(e, &[prompt.to_vec()], |p, sink| {
        let mut r = greedy(p.clone(), n, sink);
        r.logprobs = Some(0);
        r
    });
    heard[0]
        .0
        .iter()
        .map(|t| (t.id, t.logprobs.as_ref().expect("asked for").logprob))
        .collect()
}

fn check(arch: &str) {
    // 70 tokens: 4 full blocks, the last token in a fifth.
    let prompt: Vec<u32> = (0..70).map(|i| (i * 11 % 190) + 5).collect();
    let mut prefill = engine(arch, 4, 32, 40);
    let mut decode = engine(arch, 4, 32, 40);
    let mut alone = engine(arch, 4, 32, 40);
    let want = run(&mut alone, &prompt, 12);

    // The prefill side computes the prompt only, then pins its cached blocks.
    drive(&mut prefill, std::slice::from_ref(&prompt), |p, sink| {
        greedy(p.clone(), 0, sink)
    });
    let pinned = pin(&mut prefill, &prompt);
    assert_eq!(pinned.blocks.len(), 4, "{arch}");

    // Pinned blocks survive pressure that evicts every other cached block: prompts needing
    // more blocks than are free run meanwhile, and the pinned bytes do not change.
    let src = prefill.kv_regions();
    let snapshot = |regions: &[KvRegion], blocks: &[u32]| -> Vec<u8> {
        let mut out = Vec::new();
        for r in regions {
            for &b in blocks {
                // SAFETY: inside the region; the engine is not stepping.
                out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(
                        (r.addr + b as usize * r.block_bytes) as *const u8,
                        r.block_bytes,
                    )
                });
            }
        }
        out
    };
    let before = snapshot(&src, &pinned.blocks);
    let others: Vec<Vec<u32>> = (0..4)
        .map(|k| (0..150).map(|i| ((i * 13 + k * 101) % 250) + 3).collect())
        .collect();
    drive(&mut prefill, &others, |p, sink| greedy(p.clone(), 2, sink));
    assert_eq!(
        snapshot(&src, &pinned.blocks),
        before,
        "{arch}: a pinned block was rewritten"
    );

    // The decode side reserves blocks for all but the prompt's last token, takes the rows,
    // commits, and runs the request as usual.
    let res = reserve(&mut decode, &prompt, pinned.blocks.len());
    assert_eq!((res.cached, res.fill.len()), (0, 4), "{arch}");
    let dst = decode.kv_regions();
    for (i, &to) in res.fill.iter().enumerate() {
        copy_block(&src, pinned.blocks[i], &dst, to);
    }
    decode.kv_op(KvOp::Commit {
        lease: res.lease,
        filled: res.fill.len(),
    });
    decode.kv_op(KvOp::Release { lease: res.lease });
    prefill.kv_op(KvOp::Release {
        lease: pinned.lease,
    });
    let got = run(&mut decode, &prompt, 12);
    assert_eq!(
        got, want,
        "{arch}: tokens after an import differ from computing alone"
    );
    let st = decode.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&st.kv_imported_blocks), 4, "{arch}");
    assert_eq!(load(&st.prefix_hit_tokens), 4 * BLOCK_SIZE as u64, "{arch}");
    // Only the tail of the prompt was computed here.
    assert_eq!(
        load(&st.prompt_tokens_computed),
        (70 - 4 * BLOCK_SIZE) as u64,
        "{arch}"
    );
    for e in [&prefill, &decode] {
        assert_eq!(e.num_leases(), 0);
        assert_eq!(
            e.stats()
                .blocks_in_use
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{arch}: blocks leaked"
        );
    }

    // The same prompt again: everything imported is cached, nothing is reserved afresh.
    let again = reserve(&mut decode, &prompt, 4);
    assert_eq!((again.cached, again.fill.len()), (4, 0), "{arch}");
    decode.kv_op(KvOp::Release { lease: again.lease });

    // Committed rows are what the engine reads: blocks committed without the copy (zeros)
    // change the output, so the comparison above is not vacuous.
    let mut blank = engine(arch, 4, 32, 40);
    let res = reserve(&mut blank, &prompt, 4);
    blank.kv_op(KvOp::Commit {
        lease: res.lease,
        filled: res.fill.len(),
    });
    blank.kv_op(KvOp::Release { lease: res.lease });
    assert_ne!(
        run(&mut blank, &prompt, 12),
        want,
        "{arch}: uncopied blocks gave the same output"
    );

    // A reservation released without a commit registers nothing: the prompt is computed.
    let mut dropped = engine(arch, 4, 32, 40);
    let res = reserve(&mut dropped, &prompt, 4);
    dropped.kv_op(KvOp::Release { lease: res.lease });
    assert_eq!(run(&mut dropped, &prompt, 12), want, "{arch}");
    assert_eq!(
        load(&dropped.stats().prompt_tokens_computed),
        70,
        "{arch}: an uncommitted reservation was used"
    );
}

#[test]
fn imported_blocks_give_the_tokens_of_computing_alone() {
    check("llama");
}

#[test]
fn imported_latent_blocks_give_the_tokens_of_computing_alone() {
    // MLA: one region per layer (the values are the latent in the keys), and the indexer's keys
    // (DeepSeek-V3.2) in regions of their own.
    check("deepseek_v3");
    check("deepseek_v32");
}

#[test]
fn imported_compressed_attention_blocks_give_the_tokens_of_computing_alone() {
    // DeepSeek-V4: the key-value rows, and the compressors' projections and entries in the
    // rows beside them.
    check("deepseek_v4");
}
