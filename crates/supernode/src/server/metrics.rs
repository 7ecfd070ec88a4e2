//! Prometheus metrics: request outcomes, token counts, latency histograms, and the engine's
//! queue, KV block and prefix-cache figures (read from its live stats at scrape time), and
//! speculative decoding's drafts, draft tokens, accepted tokens and acceptance rate, labelled
//! by proposer (vLLM's `spec_decode_*` figures), when the engine speculates.

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use supernode_engine::engine::EngineStats;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    waiting: IntGauge,
    running: IntGauge,
    blocks_in_use: IntGauge,
    blocks_total: IntGauge,
    blocks_cached: IntGauge,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    steps: IntCounter,
    spec_drafts: IntCounterVec,
    spec_draft_tokens: IntCounterVec,
    spec_accepted_tokens: IntCounterVec,
    spec_acceptance: GaugeVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "supernode_requests_total",
                "Requests by outcome: stop, length, cancelled, error (engine), invalid (4xx), rejected (queue full)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        r.register(Box::new(requests.clone()))
            .expect("unique metric");
        let lat = [
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
        ];
        let ttft = [
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
        ];
        Metrics {
            requests,
            prompt_tokens: counter(
                &r,
                "supernode_prompt_tokens_total",
                "Prompt tokens of finished requests",
            ),
            generation_tokens: counter(
                &r,
                "supernode_generation_tokens_total",
                "Tokens generated for finished requests",
            ),
            cached_prompt_tokens: counter(
                &r,
                "supernode_cached_prompt_tokens_total",
                "Prompt tokens of finished requests taken from the prefix cache",
            ),
            ttft: histogram(
                &r,
                "supernode_time_to_first_token_seconds",
                "Time from request arrival to its first token",
                &ttft,
            ),
            itl: histogram(
                &r,
                "supernode_inter_token_latency_seconds",
                "Time between consecutive tokens of a request",
                &lat,
            ),
            e2e: histogram(
                &r,
                "supernode_e2e_request_latency_seconds",
                "Time from request arrival to its last token",
                &ttft,
            ),
            waiting: gauge(
                &r,
                "supernode_num_requests_waiting",
                "Requests waiting for admission",
            ),
            running: gauge(
                &r,
                "supernode_num_requests_running",
                "Requests being computed",
            ),
            blocks_in_use: gauge(
                &r,
                "supernode_kv_blocks_in_use",
                "KV cache blocks held by requests",
            ),
            blocks_total: gauge(
                &r,
                "supernode_kv_blocks_total",
                "KV cache blocks in the pool",
            ),
            blocks_cached: gauge(
                &r,
                "supernode_prefix_cache_blocks",
                "KV blocks registered in the prefix cache (in use or evictable)",
            ),
            prefix_hits: counter(
                &r,
                "supernode_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache on admission",
            ),
            preemptions: counter(
                &r,
                "supernode_preemptions_total",
                "Sequences preempted for lack of KV blocks (recomputed later)",
            ),
            steps: counter(
                &r,
                "supernode_engine_steps_total",
                "Forward passes of the engine loop",
            ),
            spec_drafts: counter_vec(
                &r,
                "supernode_spec_decode_num_drafts_total",
                "Verifications of at least one draft token (speculative decoding)",
                "proposer",
            ),
            spec_draft_tokens: counter_vec(
                &r,
                "supernode_spec_decode_num_draft_tokens_total",
                "Draft tokens verified by the target model",
                "proposer",
            ),
            spec_accepted_tokens: counter_vec(
                &r,
                "supernode_spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted",
                "proposer",
            ),
            spec_acceptance: {
                let g = GaugeVec::new(
                    Opts::new(
                        "supernode_spec_decode_acceptance_rate",
                        "Accepted over verified draft tokens since the start",
                    ),
                    &["proposer"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry: r,
        }
    }

    /// The text exposition, with the engine figures brought up to date.
    pub fn render(&self, st: &EngineStats) -> String {
        let g = |x: &std::sync::atomic::AtomicUsize| x.load(Ordering::Relaxed) as i64;
        self.waiting.set(g(&st.waiting));
        self.running.set(g(&st.running));
        self.blocks_in_use.set(g(&st.blocks_in_use));
        self.blocks_total.set(g(&st.blocks_total));
        self.blocks_cached.set(g(&st.blocks_cached));
        let catch_up = |c: &IntCounter, v: u64| {
            let now = c.get();
            if v > now {
                c.inc_by(v - now);
            }
        };
        catch_up(
            &self.prefix_hits,
            st.prefix_hit_tokens.load(Ordering::Relaxed),
        );
        catch_up(&self.preemptions, st.preemptions.load(Ordering::Relaxed));
        catch_up(&self.steps, st.steps.load(Ordering::Relaxed));
        if let Some(name) = st.spec_proposer.get() {
            let drafted = st.spec_draft_tokens.load(Ordering::Relaxed);
            let accepted = st.spec_accepted_tokens.load(Ordering::Relaxed);
            let l = [*name];
            catch_up(
                &self.spec_drafts.with_label_values(&l),
                st.spec_drafts.load(Ordering::Relaxed),
            );
            catch_up(&self.spec_draft_tokens.with_label_values(&l), drafted);
            catch_up(&self.spec_accepted_tokens.with_label_values(&l), accepted);
            let rate = if drafted > 0 {
                accepted as f64 / drafted as f64
            } else {
                0.0
            };
            self.spec_acceptance.with_label_values(&l).set(rate);
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }
}
