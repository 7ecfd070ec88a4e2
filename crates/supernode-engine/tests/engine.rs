//! The engine loop on the tiny random Llama of `tests/fixtures/hf/llama` (transformers'
//! outputs recorded): batch invariance, preemption, prefix reuse, cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use supernode_engine::engine::{EngineConfig, EngineHandle, Event, Finish, FinishReason, Sink};
use supernode_models::{load_model, LoadOptions};

mod common;
use common::{config, fixture, greedy, xorshift};

fn engine(max_num_seqs: usize, max_num_batched_tokens: usize, num_blocks: usize) -> EngineHandle {
    engine_of("llama", max_num_seqs, max_num_batched_tokens, num_blocks)
}

fn engine_of(
    arch: &str,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    num_blocks: usize,
) -> EngineHandle {
    engine_with_slots(arch, max_num_seqs, max_num_batched_tokens, num_blocks, 0)
}

/// `state_slots`: recurrent state slots of a hybrid model (0: one per sequence).
fn engine_with_slots(
    arch: &str,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    num_blocks: usize,
    state_slots: usize,
) -> EngineHandle {
    let m = load_model(&fixture(arch), &LoadOptions::default()).unwrap();
    let cfg = EngineConfig {
        state_slots,
        ..config(max_num_seqs, max_num_batched_tokens, num_blocks)
    };
    EngineHandle::start(m.model, None, cfg).unwrap()
}

struct ChanSink {
    tx: Sender<Event>,
    closed: Arc<AtomicBool>,
}

impl Sink for ChanSink {
    fn send(&mut self, event: Event) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.tx.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

struct Pending {
    rx: Receiver<Event>,
    closed: Arc<AtomicBool>,
}

impl Pending {
    fn wait(self) -> (Vec<u32>, Finish) {
        let (toks, fin) = self.wait_logprobs();
        (toks.into_iter().map(|(t, _)| t).collect(), fin)
    }

    /// Each token with the bits of its log-probability.
    fn wait_logprobs(self) -> (Vec<(u32, u32)>, Finish) {
        let mut toks = Vec::new();
        loop {
            match self.rx.recv_timeout(Duration::from_secs(120)).unwrap() {
                Event::Token(t) => {
                    let lp = t.logprobs.map_or(0, |l| l.logprob.to_bits());
                    toks.push((t.id, lp));
                }
                Event::Done(f) => return (toks, f),
                Event::Error(e) => panic!("engine error: {e}"),
                Event::PromptLogits(_) | Event::PromptLogprobs(_) => {
                    panic!("prompt logits were not asked for")
                }
            }
        }
    }
}

fn submit(e: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Pending {
    let (tx, rx) = channel();
    let closed = Arc::new(AtomicBool::new(false));
    let sink = Box::new(ChanSink {
        tx,
        closed: closed.clone(),
    });
    let req = supernode_engine::engine::Request {
        logprobs: Some(0),
        ..greedy(prompt, max_tokens, sink)
    };
    e.submit(req).unwrap();
    Pending { rx, closed }
}

/// Deterministic pseudo-random prompts of varied lengths.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    let mut x = xorshift(0x9e3779b97f4a7c15);
    (0..n)
        .map(|i| {
            let len = 1 + (i * 37) % 90;
            (0..len).map(|_| (x() % 256) as u32).collect()
        })
        .collect()
}

fn wait_idle(e: &EngineHandle) {
    for _ in 0..200 {
        let st = e.stats();
        if st.running.load(Ordering::Relaxed) == 0
            && st.waiting.load(Ordering::Relaxed) == 0
            && st.blocks_in_use.load(Ordering::Relaxed) == 0
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("engine did not go idle");
}

#[test]
fn greedy_matches_transformers() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("expected.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = ids(&expected["greedy"]["prompt"]);
    let want = ids(&expected["greedy"]["tokens"]);
    let e = engine(4, 64, 64);
    let (got, fin) = submit(&e, prompt.clone(), want.len()).wait();
    assert_eq!(got, want);
    assert_eq!(fin.reason, FinishReason::Length);
    assert_eq!(fin.prompt_tokens, prompt.len());
    assert_eq!(fin.completion_tokens, want.len());
}

#[test]
fn outputs_do_not_depend_on_the_batch_or_on_preemption() {
    batch_invariance("llama");
}

/// Mixture-of-experts routing and MLA's latent cache keep a token's result independent of
/// the batch too.
#[test]
fn moe_and_mla_outputs_do_not_depend_on_the_batch() {
    batch_invariance("qwen3_moe");
    batch_invariance("deepseek_v3");
}

/// DeepSeek-V3.2's sparse attention (each query past position 8 attends to the 8 positions its
/// indexer picks from the cached indexer keys): 12 sequences at once, chunked between each
/// other's decodes, and preempted and recomputed, give each one's output alone.
#[test]
fn sparse_attention_outputs_do_not_depend_on_the_batch_or_on_preemption() {
    batch_invariance("deepseek_v32");
}

/// The indexer's keys are per token and cached beside the latent, so a prefix-cache hit gives
/// a query the same keys to pick from as computing the prefix again: the same tokens, with the
/// shared blocks counted as cached.
#[test]
fn sparse_attention_reuses_a_shared_prefix() {
    reuses_a_shared_prefix("deepseek_v32");
}

/// DeepSeek-V4 (sliding, compressed sparse and heavily compressed layers, hyper-connections,
/// hash routing): 12 sequences at once, chunked between each other's decodes, and preempted and
/// recomputed, give each one's output alone; a window that closes in a later chunk or step reads
/// its earlier tokens' projections back from the cache.
#[test]
fn compressed_attention_outputs_do_not_depend_on_the_batch_or_on_preemption() {
    batch_invariance("deepseek_v4");
}

/// DeepSeek-V4's compressed entries and the projections they pool are per position, in the
/// token's cache rows, so a prefix-cache hit gives the same tokens as computing the prefix: the
/// first window after the 64 cached tokens reads the last cached window's projections (CSA's
/// overlap) back from the shared blocks.
#[test]
fn compressed_attention_reuses_a_shared_prefix() {
    reuses_a_shared_prefix("deepseek_v4");
}

fn reuses_a_shared_prefix(arch: &str) {
    let e = engine_of(arch, 4, 256, 64);
    let cold = engine_of(arch, 4, 256, 64);
    let base = prompts(40).into_iter().max_by_key(|p| p.len()).unwrap();
    let (first, _) = submit(&e, base.clone(), 12).wait();
    let (again, f2) = submit(&e, base.clone(), 12).wait();
    assert_eq!(again, first);
    assert_eq!(f2.cached_tokens, (base.len() - 1) / 16 * 16);
    let mut other = base[..64].to_vec();
    other.extend([1, 2, 3]);
    let (hit, f3) = submit(&e, other.clone(), 12).wait();
    assert_eq!(f3.cached_tokens, 64);
    let (computed, f4) = submit(&cold, other, 12).wait();
    assert_eq!(f4.cached_tokens, 0);
    assert_eq!(hit, computed);
}

/// Hybrid models (Gated DeltaNet linear attention beside attention, a recurrent state slot
/// per request): 12 concurrent sequences with prompts of up to three linear-attention windows
/// get the same tokens with the same log-probabilities, bit for bit, as each alone: also when
/// other requests' decodes move where their prefill chunks end (the scheduler cuts prompts
/// only at window boundaries), and when the KV pool is so small that sequences are preempted
/// and recomputed from their first token (generated tokens token by token, as decoded).
#[test]
fn hybrid_outputs_do_not_depend_on_the_batch_or_on_preemption() {
    let ps: Vec<Vec<u32>> = {
        let mut x = xorshift(0x51ed27);
        (0..12)
            .map(|i| {
                (0..1 + (i * 53) % 190)
                    .map(|_| (x() % 256) as u32)
                    .collect()
            })
            .collect()
    };
    let all = |e: &EngineHandle| -> Vec<Vec<(u32, u32)>> {
        let pend: Vec<Pending> = ps.iter().map(|p| submit(e, p.clone(), 24)).collect();
        pend.into_iter().map(|p| p.wait_logprobs().0).collect()
    };
    for arch in ["qwen3_5", "qwen3_5_moe", "qwen3_next"] {
        let alone = engine_of(arch, 1, 64, 64);
        let solo: Vec<Vec<(u32, u32)>> = ps
            .iter()
            .map(|p| submit(&alone, p.clone(), 24).wait_logprobs().0)
            .collect();
        let busy = engine_of(arch, 16, 100, 256);
        assert_eq!(all(&busy), solo, "{arch}: in a batch");
        wait_idle(&busy);
        let tight = engine_of(arch, 16, 64, 16);
        assert_eq!(all(&tight), solo, "{arch}: preempted");
        assert!(tight.stats().preemptions.load(Ordering::Relaxed) > 0);
        wait_idle(&tight);
    }
}

/// Fewer state slots than sequences: requests wait for a slot, and every one finishes with
/// the tokens it gets alone; the split of a `--kv-cache-mib` budget into state slots and
/// blocks, and a budget that holds four sequences' state and ten blocks, runs everyone to the
/// end too, with preemptions.
#[test]
fn hybrid_state_slots_limit_the_running_requests() {
    let ps = prompts(12);
    let alone = engine_of("qwen3_5", 1, 64, 64);
    let solo: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| submit(&alone, p.clone(), 20).wait().0)
        .collect();
    let few = engine_with_slots("qwen3_5", 16, 96, 128, 3);
    let pend: Vec<Pending> = ps.iter().map(|p| submit(&few, p.clone(), 20)).collect();
    let got: Vec<Vec<u32>> = pend.into_iter().map(|p| p.wait().0).collect();
    assert_eq!(got, solo);
    wait_idle(&few);

    let m = load_model(&fixture("qwen3_5"), &LoadOptions::default()).unwrap();
    let (specs, widths) = (m.model.kv_specs(), m.model.state_widths());
    let slot = supernode_models::KvCache::bytes_per_state_slot(&widths);
    let block = supernode_models::KvCache::bytes_per_token(&specs) * 16;
    // Four sequences' state and ten blocks.
    let bytes = 4 * slot + 10 * block;
    let (blocks, slots) = EngineConfig::budget(&specs, &widths, bytes, 4);
    assert_eq!((blocks, slots), (10, 4));
    // Up to `max_num_seqs` slots, in at most half the budget; one if it fits at all.
    let (b, s) = EngineConfig::budget(&specs, &widths, bytes, 64);
    assert_eq!(s, (bytes / 2 / slot).min(64));
    assert_eq!(b, (bytes - s * slot) / block);
    assert_eq!(
        EngineConfig::budget(&specs, &widths, slot + block, 8),
        (1, 1)
    );
    assert_eq!(EngineConfig::budget(&specs, &widths, slot - 1, 8).1, 0);
    let tight = engine_with_slots("qwen3_5", 4, 64, blocks, slots);
    let pend: Vec<Pending> = ps.iter().map(|p| submit(&tight, p.clone(), 20)).collect();
    let got: Vec<Vec<u32>> = pend.into_iter().map(|p| p.wait().0).collect();
    assert_eq!(got, solo);
    assert!(tight.stats().preemptions.load(Ordering::Relaxed) > 0);
    wait_idle(&tight);
}

/// A hybrid model's cached blocks would give K/V but no recurrent state: its prefix cache is
/// off, and a repeated prompt is computed again (with the same result).
#[test]
fn hybrid_models_do_not_reuse_prefixes() {
    let e = engine_of("qwen3_next", 4, 64, 64);
    let p: Vec<u32> = (0..40).map(|i| (i * 7 % 256) as u32).collect();
    let (a, fa) = submit(&e, p.clone(), 8).wait();
    let (b, fb) = submit(&e, p, 8).wait();
    assert_eq!(a, b);
    assert_eq!((fa.cached_tokens, fb.cached_tokens), (0, 0));
    wait_idle(&e);
    assert_eq!(e.stats().blocks_cached.load(Ordering::Relaxed), 0);
}

fn batch_invariance(arch: &str) {
    let engine = |a, b, c| engine_of(arch, a, b, c);
    let ps = prompts(12);
    let alone = engine(1, 32, 64);
    let solo: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| submit(&alone, p.clone(), 24).wait().0)
        .collect();

    // All at once, prefill chunks of at most 40 tokens between other sequences' decodes.
    let busy = engine(16, 40, 128);
    let pend: Vec<Pending> = ps.iter().map(|p| submit(&busy, p.clone(), 24)).collect();
    let together: Vec<Vec<u32>> = pend.into_iter().map(|p| p.wait().0).collect();
    assert_eq!(together, solo);
    wait_idle(&busy);

    // A pool far too small for all of them at once: sequences are preempted and recomputed.
    let tight = engine(16, 64, 10);
    let pend: Vec<Pending> = ps.iter().map(|p| submit(&tight, p.clone(), 24)).collect();
    let squeezed: Vec<Vec<u32>> = pend.into_iter().map(|p| p.wait().0).collect();
    assert_eq!(squeezed, solo);
    assert!(tight.stats().preemptions.load(Ordering::Relaxed) > 0);
    wait_idle(&tight);
}

#[test]
fn a_shared_prefix_is_reused() {
    let e = engine(4, 256, 64);
    let base = prompts(40).into_iter().max_by_key(|p| p.len()).unwrap();
    assert!(base.len() >= 70);
    let (first, f1) = submit(&e, base.clone(), 8).wait();
    assert_eq!(f1.cached_tokens, 0);
    let (again, f2) = submit(&e, base.clone(), 8).wait();
    assert_eq!(again, first);
    // Every full block but the one holding the last prompt token.
    assert_eq!(f2.cached_tokens, (base.len() - 1) / 16 * 16);
    let mut other = base[..64].to_vec();
    other.extend([1, 2, 3]);
    let (_, f3) = submit(&e, other, 4).wait();
    assert_eq!(f3.cached_tokens, 64);
    assert!(e.stats().prefix_hit_tokens.load(Ordering::Relaxed) >= 64 + 64);
}

#[test]
fn closed_clients_free_their_blocks() {
    let e = engine(8, 32, 64);
    let pend: Vec<Pending> = prompts(6).into_iter().map(|p| submit(&e, p, 200)).collect();
    std::thread::sleep(Duration::from_millis(50));
    for p in &pend {
        p.closed.store(true, Ordering::Relaxed);
    }
    wait_idle(&e);
    // Still serving afterwards.
    let (toks, _) = submit(&e, vec![5, 6, 7], 3).wait();
    assert_eq!(toks.len(), 3);
}

#[test]
fn the_context_end_finishes_with_length() {
    let e = engine(2, 64, 64);
    let (toks, fin) = submit(&e, vec![3; 250], 100).wait();
    assert_eq!(fin.reason, FinishReason::Length);
    // Positions 250..255 are computed; the token after position 255 is the last one.
    assert_eq!(toks.len(), 256 - 250 + 1);
}

#[test]
fn bad_requests_are_refused() {
    let e = engine(2, 64, 4);
    let (tx, _rx) = channel();
    let sink = || {
        Box::new(ChanSink {
            tx: tx.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        })
    };
    let req = |prompt: Vec<u32>| greedy(prompt, 1, sink());
    assert!(e.submit(req(vec![])).is_err());
    assert!(e.submit(req(vec![999])).is_err());
    // 4 blocks hold 64 tokens.
    let err = e.submit(req(vec![1; 65])).unwrap_err().to_string();
    assert!(err.contains("65") && err.contains("64"), "{err}");
}

#[test]
fn a_cache_too_small_for_everyone_never_stalls() {
    // 4 blocks hold 64 tokens; two sequences each want 30 + 100.
    let e = engine(2, 256, 4);
    let a = submit(&e, vec![7; 30], 100);
    let b = submit(&e, vec![9; 30], 100);
    let (ta, fa) = a.wait();
    let (tb, fb) = b.wait();
    assert_eq!(fa.reason, FinishReason::Length);
    assert_eq!(fb.reason, FinishReason::Length);
    // Each got at least as far as the cache holds alone.
    assert!(
        ta.len() >= 64 - 30 && tb.len() >= 64 - 30,
        "{} {}",
        ta.len(),
        tb.len()
    );
    wait_idle(&e);
}
