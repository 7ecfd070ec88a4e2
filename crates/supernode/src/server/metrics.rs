//! Prometheus metrics: request outcomes, token counts, latency histograms, and the engine's
//! queue, KV block and prefix-cache figures (read from its live stats at scrape time), and
//! speculative decoding's drafts, draft tokens, accepted tokens and acceptance rate, labelled
//! by proposer (vLLM's `spec_decode_*` figures), when the engine speculates.
//!
//! Beside supernode's own `supernode_*` names, the same figures are written under vLLM's names,
//! types, labels (`model_name`, `engine`) and bucket bounds, as vLLM 0.10 and later write them
//! (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_hits_total`,
//! `vllm:inter_token_latency_seconds`, ...), so that routers and dashboards written for vLLM
//! (SMG, vllm-router, llm-d's endpoint picker) read a replica unchanged. Both sets are fed by
//! the same observations, so they cannot disagree.

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use supernode_engine::engine::{EngineStats, BLOCK_SIZE};

/// What `vllm:cache_config_info` says of the KV cache.
pub struct CacheInfo {
    /// Blocks of [`BLOCK_SIZE`] tokens in the pool (vLLM's `num_gpu_blocks`).
    pub num_blocks: usize,
    pub prefix_caching: bool,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    cached_prompt_tokens: IntCounter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
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
    vllm: Vllm,
}

/// The vLLM-named series, each the one child of its family for this server's
/// `model_name` and engine `0`.
struct Vllm {
    /// `[model_name, engine]`, the first two label values of every series.
    labels: [String; 2],
    waiting: IntGauge,
    running: IntGauge,
    kv_usage: Gauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    /// Labelled further by `finished_reason`: stop, length, abort.
    success: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    /// vLLM's older name for the inter-token latency, still written by vLLM 0.10 and 0.11.
    tpot: Histogram,
    e2e: Histogram,
}

/// vLLM's two labels on every series.
const VLLM_LABELS: [&str; 2] = ["model_name", "engine"];

/// vLLM's bucket bounds, so that `le` thresholds of dashboards written for it fall on a bound.
const VLLM_TTFT: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const VLLM_ITL: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const VLLM_E2E: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("valid metric"))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, Histogram::with_opts(opts).expect("valid metric"))
}

impl Vllm {
    fn new(r: &Registry, model_name: &str, cache: &CacheInfo) -> Vllm {
        let labels = [model_name.to_string(), "0".to_string()];
        let l = [labels[0].as_str(), labels[1].as_str()];
        let counter =
            |name: &str, help: &str| counter_vec(r, name, help, &VLLM_LABELS).with_label_values(&l);
        let int_gauge = |name: &str, help: &str| {
            register(
                r,
                IntGaugeVec::new(Opts::new(name, help), &VLLM_LABELS).expect("valid metric"),
            )
            .with_label_values(&l)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(
                r,
                HistogramVec::new(opts, &VLLM_LABELS).expect("valid metric"),
            )
            .with_label_values(&l)
        };
        // vLLM writes its cache config as an info gauge: 1, with the config in the labels.
        let info = [
            ("model_name", model_name.to_string()),
            ("engine", "0".to_string()),
            ("block_size", BLOCK_SIZE.to_string()),
            ("num_gpu_blocks", cache.num_blocks.to_string()),
            ("num_cpu_blocks", "0".to_string()),
            (
                "enable_prefix_caching",
                if cache.prefix_caching {
                    "True"
                } else {
                    "False"
                }
                .to_string(),
            ),
        ];
        let names: Vec<&str> = info.iter().map(|(k, _)| *k).collect();
        let values: Vec<&str> = info.iter().map(|(_, v)| v.as_str()).collect();
        register(
            r,
            GaugeVec::new(
                Opts::new(
                    "vllm:cache_config_info",
                    "Information of the LLMEngine CacheConfig",
                ),
                &names,
            )
            .expect("valid metric"),
        )
        .with_label_values(&values)
        .set(1.0);
        let success = counter_vec(
            r,
            "vllm:request_success_total",
            "Count of successfully processed requests.",
            &["model_name", "engine", "finished_reason"],
        );
        // Every reason is written from the start, at 0, as vLLM does.
        for reason in ["stop", "length", "abort"] {
            success.with_label_values(&[l[0], l[1], reason]);
        }
        Vllm {
            waiting: int_gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            running: int_gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            ),
            kv_usage: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "vllm:kv_cache_usage_perc",
                        "KV-cache usage. 1 means 100 percent usage.",
                    ),
                    &VLLM_LABELS,
                )
                .expect("valid metric"),
            )
            .with_label_values(&l),
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
            preemptions: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
            ),
            prompt_tokens: counter(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
            ),
            generation_tokens: counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            ),
            success,
            ttft: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &VLLM_TTFT,
            ),
            itl: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &VLLM_ITL,
            ),
            tpot: histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds. DEPRECATED: use vllm:inter_token_latency_seconds.",
                &VLLM_ITL,
            ),
            e2e: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &VLLM_E2E,
            ),
            labels,
        }
    }
}

/// Brings a counter up to a running total kept elsewhere (the engine's stats).
fn catch_up(c: &IntCounter, v: u64) {
    let now = c.get();
    if v > now {
        c.inc_by(v - now);
    }
}

impl Metrics {
    pub fn new(model_name: &str, cache: &CacheInfo) -> Metrics {
        let r = Registry::new();
        let lat = [
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
        ];
        let ttft = [
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
        ];
        Metrics {
            requests: counter_vec(
                &r,
                "supernode_requests_total",
                "Requests by outcome: stop, length, cancelled, error (engine), invalid (4xx), rejected (queue full)",
                &["outcome"],
            ),
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
                &["proposer"],
            ),
            spec_draft_tokens: counter_vec(
                &r,
                "supernode_spec_decode_num_draft_tokens_total",
                "Draft tokens verified by the target model",
                &["proposer"],
            ),
            spec_accepted_tokens: counter_vec(
                &r,
                "supernode_spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted",
                &["proposer"],
            ),
            spec_acceptance: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "supernode_spec_decode_acceptance_rate",
                        "Accepted over verified draft tokens since the start",
                    ),
                    &["proposer"],
                )
                .expect("valid metric"),
            ),
            vllm: Vllm::new(&r, model_name, cache),
            registry: r,
        }
    }

    /// A request's first token, `secs` after it arrived.
    pub fn first_token(&self, secs: f64) {
        self.ttft.observe(secs);
        self.vllm.ttft.observe(secs);
    }

    /// A token `secs` after the one before it of the same sequence.
    pub fn next_token(&self, secs: f64) {
        self.itl.observe(secs);
        self.vllm.itl.observe(secs);
        self.vllm.tpot.observe(secs);
    }

    /// A finished request's prompt, `cached` of its tokens taken from the prefix cache.
    pub fn prompt(&self, tokens: usize, cached: usize) {
        self.prompt_tokens.inc_by(tokens as u64);
        self.cached_prompt_tokens.inc_by(cached as u64);
        self.vllm.prompt_tokens.inc_by(tokens as u64);
    }

    /// Tokens generated for a finished sequence.
    pub fn generated(&self, tokens: usize) {
        self.generation_tokens.inc_by(tokens as u64);
        self.vllm.generation_tokens.inc_by(tokens as u64);
    }

    /// A request the engine served to its end: `outcome` is stop, length, cancelled or error;
    /// `e2e` the seconds from its arrival to its last token, where it had tokens to time.
    pub fn finished(&self, outcome: &str, e2e: Option<f64>) {
        self.requests.with_label_values(&[outcome]).inc();
        // vLLM's finish reasons: a cancelled request and one the engine failed were aborted.
        let reason = match outcome {
            "stop" | "length" => outcome,
            _ => "abort",
        };
        let [model, engine] = &self.vllm.labels;
        self.vllm
            .success
            .with_label_values(&[model.as_str(), engine.as_str(), reason])
            .inc();
        if let Some(secs) = e2e {
            self.e2e.observe(secs);
            self.vllm.e2e.observe(secs);
        }
    }

    /// The text exposition, with the engine figures brought up to date.
    pub fn render(&self, st: &EngineStats) -> String {
        let g = |x: &std::sync::atomic::AtomicUsize| x.load(Ordering::Relaxed) as i64;
        let (waiting, running) = (g(&st.waiting), g(&st.running));
        let (in_use, total) = (g(&st.blocks_in_use), g(&st.blocks_total));
        self.waiting.set(waiting);
        self.running.set(running);
        self.blocks_in_use.set(in_use);
        self.blocks_total.set(total);
        self.blocks_cached.set(g(&st.blocks_cached));
        let hits = st.prefix_hit_tokens.load(Ordering::Relaxed);
        let preempted = st.preemptions.load(Ordering::Relaxed);
        catch_up(&self.prefix_hits, hits);
        catch_up(&self.preemptions, preempted);
        catch_up(&self.steps, st.steps.load(Ordering::Relaxed));
        let v = &self.vllm;
        v.waiting.set(waiting);
        v.running.set(running);
        v.kv_usage.set(if total > 0 {
            in_use as f64 / total as f64
        } else {
            0.0
        });
        catch_up(
            &v.prefix_queries,
            st.prefix_query_tokens.load(Ordering::Relaxed),
        );
        catch_up(&v.prefix_hits, hits);
        catch_up(&v.preemptions, preempted);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(
            "m",
            &CacheInfo {
                num_blocks: 8,
                prefix_caching: true,
            },
        )
    }

    #[test]
    fn vllm_gauges_read_the_engine_stats() {
        let st = EngineStats::default();
        st.running.store(3, Ordering::Relaxed);
        st.waiting.store(1, Ordering::Relaxed);
        st.blocks_total.store(8, Ordering::Relaxed);
        st.blocks_in_use.store(2, Ordering::Relaxed);
        st.prefix_query_tokens.store(100, Ordering::Relaxed);
        st.prefix_hit_tokens.store(64, Ordering::Relaxed);
        let text = metrics().render(&st);
        for line in [
            r#"vllm:num_requests_running{engine="0",model_name="m"} 3"#,
            r#"vllm:num_requests_waiting{engine="0",model_name="m"} 1"#,
            r#"vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25"#,
            r#"vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100"#,
            r#"vllm:prefix_cache_hits_total{engine="0",model_name="m"} 64"#,
            r#"vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",model_name="m",num_cpu_blocks="0",num_gpu_blocks="8"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn a_cancelled_or_failed_request_is_an_abort_for_vllm() {
        let m = metrics();
        m.finished("cancelled", None);
        m.finished("error", None);
        m.finished("stop", Some(0.5));
        let text = m.render(&EngineStats::default());
        let line = |reason: &str, n: u64| {
            format!(
                r#"vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="m"}} {n}"#
            )
        };
        for l in [line("abort", 2), line("stop", 1), line("length", 0)] {
            assert!(text.lines().any(|x| x == l), "{l} missing from\n{text}");
        }
        assert!(
            text.contains(r#"vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 1"#)
        );
        assert!(text.contains(r#"supernode_requests_total{outcome="cancelled"} 1"#));
    }
}
