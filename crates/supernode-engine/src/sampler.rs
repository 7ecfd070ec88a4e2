//! Token sampler: turns one row of logits into one token id.
//!
//! The chain follows llama.cpp's common sampler order:
//!
//! ```text
//! penalties → top-k → top-p → min-p → temperature → softmax → draw
//! ```
//!
//! - **Penalties** look at the last `penalty_last_n` tokens of the history. The repetition penalty
//!   (llama.cpp / CTRL semantics) divides a seen token's positive logit by the penalty and multiplies
//!   a non-positive one by it, once per distinct token; frequency and presence penalties follow the
//!   OpenAI semantics: `logit -= count * frequency_penalty + (count > 0) * presence_penalty`.
//! - **top-k / top-p / min-p** filter on the (penalised) logits at temperature 1, as llama.cpp does;
//!   the temperature only reshapes the distribution of the survivors.
//! - **temperature** below `1e-6` means greedy: the argmax after penalties, no random draw.
//!
//! Speed on a 262k vocabulary (Gemma 3's): every pass over the vocabulary is a flat loop that the
//! compiler vectorises (sanitising copy, max, weights, block sums, threshold counts). top-k and
//! top-p first find a threshold below the maximum with a few counting / mass passes, so that only
//! the tokens above it (typically tens to a few thousand) are collected, selected
//! (`select_nth_unstable`) and sorted; large top-p candidate sets (flat distributions) are split by
//! buckets so that only the nucleus boundary is sorted. The plain draw (no top-k / top-p) picks a
//! block of tokens from per-block sums and walks only that block. Scratch buffers live in the
//! [`Sampler`]: no allocation per call after the first.
//!
//! Determinism: the random numbers come from our own xoshiro256** generator seeded through
//! splitmix64, the exponentials from our own `exp` in plain f32 arithmetic, and every sum has a
//! fixed order, so a seed gives the same tokens on every platform and with every version of the
//! dependencies (only the min-p threshold goes through the platform's `ln`).
//!
//! Non-finite logits never panic: NaN counts as `-inf` (never sampled), `+inf` as `f32::MAX` (it
//! takes all the mass, shared among the `+inf` tokens). When no token has a finite logit the
//! sampler returns token 0; an empty logits row also gives 0.

use std::cmp::Ordering;

/// Sampling parameters of one request. The defaults sample the model's own distribution:
/// temperature 1, every filter and penalty off, a random seed.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (anything below `1e-6`) means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`;
    /// `1` = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `0` = off.
    pub min_p: f32,
    /// Repetition penalty (divide positive / multiply non-positive logits of seen tokens); `1` = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token seen in the window (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of every token seen in the window (OpenAI semantics).
    pub frequency_penalty: f32,
    /// How many of the most recent history tokens the penalties look at (llama.cpp's default is
    /// 64); `0` turns the penalties off.
    pub penalty_last_n: usize,
    /// Seed of the random generator; `None` seeds from OS entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every parameter's range; the error names the parameter and the value it got.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!(
                "`temperature` must be a finite number >= 0, got {t}"
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], got {p}"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(format!("`min_p` must be in [0, 1], got {m}"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "`repetition_penalty` must be a finite number > 0, got {r}"
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return Err(format!("`{name}` must be a finite number, got {v}"));
            }
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // A NaN temperature (rejected by `validate`) also means greedy.
        self.temperature.is_nan() || self.temperature < 1e-6
    }

    fn penalties_active(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// Index of the largest logit; the lowest index wins ties, NaN counts as `-inf`, and a row with no
/// value above `-inf` (or an empty row) gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    // One pass in LANES interleaved lanes, each keeping its first index of its maximum (strict
    // `>`, false for NaN); then the best lane, lowest index among equal maxima.
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for (ci, c) in chunks.enumerate() {
        let base = (ci * LANES) as u32;
        for j in 0..LANES {
            let v = c[j];
            let better = v > best[j];
            best[j] = if better { v } else { best[j] };
            at[j] = if better { base + j as u32 } else { at[j] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut idx = 0u32;
    for j in 0..LANES {
        if best[j] > max || (best[j] == max && max > f32::NEG_INFINITY && at[j] < idx) {
            max = best[j];
            idx = at[j];
        }
    }
    let base = (logits.len() - rest.len()) as u32;
    for (i, &v) in rest.iter().enumerate() {
        if v > max {
            max = v;
            idx = base + i as u32;
        }
    }
    idx
}

/// Independent accumulators in the hot loops, so that they vectorise (the order of the float
/// operations is fixed by the code, so results do not depend on the target's vector width).
const LANES: usize = 8;

/// Sum in `LANES` interleaved partial sums (a fixed order, so the same bits everywhere).
fn lane_sum(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().chain(rest).sum()
}

/// Largest value with NaN skipped; `-inf` for an empty or all-NaN slice.
fn max_value(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // `>` is false for NaN, so NaN never wins.
            if v > *l {
                *l = v;
            }
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// e^x for x <= 0 in plain f32 arithmetic: Cody–Waite reduction to r in [-ln2/2, ln2/2] and a
/// degree-6 Taylor polynomial (relative error < 3e-7). It vectorises, and unlike the C library's
/// `expf` it gives the same bits on every platform, so seeded draws are reproducible everywhere.
/// Inputs below -87 (including `-inf`) give ~1e-38, not 0: callers mask what must weigh nothing.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact in f32, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 0.0 { 0.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low bits of t's representation are n (in [-126, 0]); shifting n + 127 into the exponent
    // field gives 2^n (the high bits fall off the top).
    p * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// One surviving token and its (penalised) logit.
#[derive(Clone, Copy, Debug)]
struct Cand {
    id: u32,
    logit: f32,
}

/// Descending logit, then ascending id: a total order, so ties always resolve the same way.
fn by_logit_desc(a: &Cand, b: &Cand) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// NaN → `-inf` (never sampled), `+inf` → `f32::MAX` (keeps the arithmetic finite).
#[inline(always)]
fn sanitize(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == f32::INFINITY {
        f32::MAX
    } else {
        v
    }
}

/// Buckets that split a large top-p boundary set by logit (flat distributions).
const N_BUCKETS: usize = 1024;
/// A top-p candidate set larger than this is split by buckets before the one sort.
const REFINE_ABOVE: usize = 2048;
/// Tokens per block of the dense draw: the draw finds its block from the block sums, then walks
/// only that block.
const BLOCK: usize = 1024;

/// Bucket of `logit` at `scale` buckets per logit unit below `top` (`top >= logit`): monotone in
/// `logit`, clamped to the last bucket (an overflow to +inf lands there too). Rounds to nearest via
/// the 2^23 trick instead of a saturating float-to-int cast: fewer instructions in the hot loops.
#[inline(always)]
fn bucket_of(top: f32, scale: f32, logit: f32) -> usize {
    const TWO_23: f32 = 8_388_608.0;
    let d = ((top - logit) * scale).min((N_BUCKETS - 1) as f32);
    // d + 2^23 has ulp 1, so its low mantissa bits are round(d); the mask also proves the index
    // in range to the compiler.
    ((d + TWO_23).to_bits() as usize) & (N_BUCKETS - 1)
}

/// Draws token ids from logits under one request's [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256StarStar,
    /// Scratch: the sanitised, penalised logits, indexed by token id.
    work: Vec<f32>,
    /// Scratch: the candidates still in the running (top-k / top-p paths).
    cands: Vec<Cand>,
    /// Scratch: the tokens of the top-p boundary bucket.
    boundary: Vec<Cand>,
    /// Scratch: the penalty window, sorted to count repeats.
    window: Vec<u32>,
    /// Scratch: unnormalised probabilities of the candidates.
    weights: Vec<f64>,
    /// Scratch: the dense draw's weight of every token.
    wbuf: Vec<f32>,
    /// Scratch: per-block weight sums of the dense draw.
    block_sums: Vec<f64>,
}

impl Sampler {
    /// A sampler for `params` (assumed validated); `seed: None` seeds from OS entropy.
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Sampler {
            params,
            rng: Xoshiro256StarStar::from_seed(seed),
            work: Vec::new(),
            cands: Vec::new(),
            boundary: Vec::new(),
            window: Vec::new(),
            weights: Vec::new(),
            wbuf: Vec::new(),
            block_sums: Vec::new(),
        }
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples the next token from one row of `logits`.
    ///
    /// `history`: the prompt followed by the tokens generated so far; the penalties look at its
    /// last `penalty_last_n` tokens (ids beyond the vocabulary are ignored).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let greedy = self.params.is_greedy();
        let penalise = self.params.penalties_active() && !history.is_empty();
        if greedy && !penalise {
            return argmax(logits);
        }

        self.work.resize(logits.len(), 0.0);
        for (o, &v) in self.work.iter_mut().zip(logits) {
            *o = sanitize(v);
        }
        if penalise {
            self.apply_penalties(history);
        }
        if greedy {
            return argmax(&self.work);
        }
        let max = max_value(&self.work);
        if max == f32::NEG_INFINITY {
            // Nothing finite (or penalties pushed everything to -inf): fall back to the raw argmax.
            return argmax(logits);
        }
        // p_i >= min_p * p_max  <=>  logit_i >= max + ln(min_p); the max always survives. Off, the
        // threshold still masks -inf.
        let min_p = self.params.min_p;
        let floor = if min_p > 0.0 {
            (max + min_p.ln()).max(f32::MIN)
        } else {
            f32::MIN
        };
        let n = self.work.len();
        let top_k = if self.params.top_k < n {
            self.params.top_k
        } else {
            0
        };
        let top_p = self.params.top_p;
        let top_p_on = top_p < 1.0; // NaN (rejected by `validate`) counts as off
        if top_k == 0 && !top_p_on {
            return self.draw_dense(max, floor);
        }
        if top_k > 0 {
            self.collect_top_k(top_k, max);
            if top_p_on {
                self.top_p_sorted(top_p);
            }
        } else {
            self.collect_top_p(top_p, max);
        }
        if min_p > 0.0 {
            self.cands.retain(|c| c.logit >= floor);
        }
        self.draw_cands(max)
    }

    /// Applies repetition / frequency / presence penalties to `self.work`.
    fn apply_penalties(&mut self, history: &[u32]) {
        let n = self.params.penalty_last_n.min(history.len());
        self.window.clear();
        self.window.extend_from_slice(&history[history.len() - n..]);
        self.window.sort_unstable();
        let rep = self.params.repetition_penalty;
        let freq = self.params.frequency_penalty;
        let presence = self.params.presence_penalty;
        for run in self.window.chunk_by(|a, b| a == b) {
            let Some(l) = self.work.get_mut(run[0] as usize) else {
                continue;
            };
            if rep != 1.0 {
                if *l > 0.0 {
                    *l /= rep;
                } else {
                    *l *= rep;
                }
            }
            *l -= run.len() as f32 * freq + presence;
        }
    }

    /// Draw over the whole vocabulary (no top-k / top-p): tokens below `floor` weigh nothing. One
    /// vectorised pass computes every weight, another sums them per block; the draw picks a block
    /// from those sums and walks only that block.
    fn draw_dense(&mut self, max: f32, floor: f32) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        self.wbuf.resize(self.work.len(), 0.0);
        for (o, &x) in self.wbuf.iter_mut().zip(&self.work) {
            let w = exp_nonpos((x - max) * inv_t);
            *o = if x >= floor { w } else { 0.0 };
        }
        self.block_sums.clear();
        let mut total = 0.0f64;
        for block in self.wbuf.chunks(BLOCK) {
            let s = lane_sum(block) as f64;
            total += s;
            self.block_sums.push(s);
        }
        let target = self.rng.next_f64() * total;
        let mut cum = 0.0f64;
        for (b, &s) in self.block_sums.iter().enumerate() {
            if s > 0.0 && target < cum + s {
                let start = b * BLOCK;
                let end = (start + BLOCK).min(self.wbuf.len());
                let mut last = start;
                for (i, &w) in self.wbuf[start..end].iter().enumerate() {
                    if w > 0.0 {
                        cum += w as f64;
                        last = start + i;
                        if target < cum {
                            break;
                        }
                    }
                }
                // If the walk's sum (another order than the lanes') fell short, the block's last
                // token with weight.
                return last as u32;
            }
            cum += s;
        }
        // Unreachable (target < total, summed in the same order); the top token as a safe answer.
        argmax(&self.work)
    }

    /// The `k` most likely tokens into `self.cands`, sorted. Vectorised counting passes find a
    /// threshold below the maximum that at least `k` tokens (and not many more) clear; only those
    /// are collected, selected and sorted.
    fn collect_top_k(&mut self, k: usize, max: f32) {
        let work = &self.work;
        let threshold = find_threshold(max, 4 * k.max(256), |t| {
            let n = count_at_least(work, t);
            (n >= k, n)
        });
        self.cands.clear();
        let cands = &mut self.cands;
        for_each_at_least(&self.work, threshold, |id, logit| {
            cands.push(Cand { id, logit })
        });
        if self.cands.len() > k {
            self.cands.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cands.truncate(k);
        }
        self.cands.sort_unstable_by(by_logit_desc);
    }

    /// Top-p over candidates already sorted by descending logit: keep the shortest prefix whose
    /// probability (normalised over these candidates) reaches `p`.
    fn top_p_sorted(&mut self, p: f32) {
        let Some(first) = self.cands.first() else {
            return;
        };
        let max = first.logit;
        let total: f64 = self
            .cands
            .iter()
            .map(|c| exp_nonpos(c.logit - max) as f64)
            .sum();
        let target = p as f64 * total;
        let mut cum = 0.0f64;
        let mut keep = self.cands.len();
        for (i, c) in self.cands.iter().enumerate() {
            cum += exp_nonpos(c.logit - max) as f64;
            if cum >= target {
                keep = i + 1;
                break;
            }
        }
        self.cands.truncate(keep);
    }

    /// Top-p over the whole vocabulary into `self.cands`, without sorting the vocabulary; the
    /// result is the same set as "sort everything, keep the shortest prefix reaching `p`".
    ///
    /// Vectorised passes compute every token's mass and the total, then find a threshold below
    /// the maximum whose mass above reaches `p`: the nucleus lies inside. Only those tokens are
    /// collected. While they are many (flat distributions) they are
    /// bucketed by logit: buckets wholly inside the nucleus are kept unsorted, later ones dropped,
    /// and the boundary bucket is split again; the last boundary is sorted and cut exactly.
    fn collect_top_p(&mut self, p: f32, max: f32) {
        let mass_of = |x: f32| {
            let w = exp_nonpos(x - max);
            if x > f32::NEG_INFINITY {
                w
            } else {
                0.0
            }
        };
        self.wbuf.resize(self.work.len(), 0.0);
        for (w, &x) in self.wbuf.iter_mut().zip(&self.work) {
            *w = mass_of(x);
        }
        let total: f64 = self.wbuf.chunks(BLOCK).map(|b| lane_sum(b) as f64).sum();
        let target = p as f64 * total;
        let (work, wbuf) = (&self.work, &self.wbuf);
        let threshold = find_threshold(max, REFINE_ABOVE, |t| {
            let (n, m) = count_and_mass_at_least(work, wbuf, t);
            // A hair of slack: these f32 lane sums must not overstate what the exact walk finds.
            (m >= target * (1.0 + 1e-4), n)
        });

        let Sampler {
            work,
            cands,
            boundary,
            ..
        } = self;
        cands.clear();
        boundary.clear();
        for_each_at_least(work, threshold, |id, logit| {
            boundary.push(Cand { id, logit })
        });
        // Mass of the tokens already known to be in the nucleus (moved to `cands`).
        let mut cum_before = 0.0f64;
        for _ in 0..4 {
            if boundary.len() <= REFINE_ABOVE {
                break;
            }
            let hi = boundary
                .iter()
                .fold(f32::NEG_INFINITY, |m, c| m.max(c.logit));
            let lo = boundary.iter().fold(f32::INFINITY, |m, c| m.min(c.logit));
            let scale = (N_BUCKETS - 1) as f32 / (hi - lo);
            if !(hi > lo && scale.is_finite() && scale > 0.0) {
                break; // all equal (already in id order), or a span too wide to split
            }
            let mut mass = [0.0f64; N_BUCKETS];
            for c in boundary.iter() {
                mass[bucket_of(hi, scale, c.logit)] += mass_of(c.logit) as f64;
            }
            let (edge, before) = edge_bucket(&mass, cum_before, target);
            cum_before = before;
            boundary.retain(|c| match bucket_of(hi, scale, c.logit).cmp(&edge) {
                Ordering::Less => {
                    cands.push(*c);
                    false
                }
                Ordering::Equal => true,
                Ordering::Greater => false,
            });
        }
        boundary.sort_unstable_by(by_logit_desc);
        let mut cum = cum_before;
        for c in boundary.iter() {
            if cum >= target {
                break;
            }
            cum += mass_of(c.logit) as f64;
            cands.push(*c);
        }
    }

    /// Draw among `self.cands` at the temperature; `max` is their largest logit.
    fn draw_cands(&mut self, max: f32) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        self.weights.clear();
        let mut total = 0.0f64;
        for c in &self.cands {
            let w = exp_nonpos((c.logit - max) * inv_t) as f64;
            total += w;
            self.weights.push(w);
        }
        let target = self.rng.next_f64() * total;
        let mut cum = 0.0f64;
        for (c, &w) in self.cands.iter().zip(&self.weights) {
            cum += w;
            if target < cum {
                return c.id;
            }
        }
        // Unreachable (target < total, summed in the same order); the last candidate.
        self.cands.last().map_or(0, |c| c.id)
    }
}

/// The first bucket at which `cum_before` plus the running mass reaches `target` (the last bucket
/// if rounding never gets there), and the cumulative mass before it.
fn edge_bucket(mass: &[f64; N_BUCKETS], mut cum_before: f64, target: f64) -> (usize, f64) {
    for (b, &m) in mass.iter().enumerate() {
        if cum_before + m >= target {
            return (b, cum_before);
        }
        cum_before += m;
    }
    (N_BUCKETS - 1, cum_before - mass[N_BUCKETS - 1])
}

/// How many of `xs` are `>= t` (vectorised).
fn count_at_least(xs: &[f32], t: f32) -> usize {
    let mut lanes = [0u32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += (x >= t) as u32;
        }
    }
    lanes.iter().map(|&l| l as usize).sum::<usize>() + rest.iter().filter(|&&x| x >= t).count()
}

/// How many of `xs` are `>= t`, and the sum of their `ws` (vectorised: f32 lanes per block, f64
/// across blocks).
fn count_and_mass_at_least(xs: &[f32], ws: &[f32], t: f32) -> (usize, f64) {
    let mut count = 0usize;
    let mut total = 0.0f64;
    for (xb, wb) in xs.chunks(BLOCK).zip(ws.chunks(BLOCK)) {
        let mut lanes = [0.0f32; LANES];
        let mut counts = [0u32; LANES];
        let mut rest = 0.0f32;
        let xc = xb.chunks_exact(LANES);
        let wc = wb.chunks_exact(LANES);
        for (&x, &w) in xc.remainder().iter().zip(wc.remainder()) {
            rest += if x >= t { w } else { 0.0 };
            count += (x >= t) as usize;
        }
        for (x8, w8) in xc.zip(wc) {
            for (((l, c), &x), &w) in lanes.iter_mut().zip(counts.iter_mut()).zip(x8).zip(w8) {
                *l += if x >= t { w } else { 0.0 };
                *c += (x >= t) as u32;
            }
        }
        total += (lanes.iter().sum::<f32>() + rest) as f64;
        count += counts.iter().map(|&c| c as usize).sum::<usize>();
    }
    (count, total)
}

/// A threshold `max - d` whose set `{x >= max - d}` passes `probe` (which returns pass/fail and
/// the set's size): `d` doubles from 1 to 64 until it passes, then bisects toward the smallest
/// passing `d` while the set holds more than `small` tokens. `f32::MIN` (every finite token) if
/// nothing within 64 logits passes.
fn find_threshold(max: f32, small: usize, mut probe: impl FnMut(f32) -> (bool, usize)) -> f32 {
    let mut lo = 0.0f32;
    let mut found = None;
    let mut d = 1.0f32;
    while d <= 64.0 {
        let (ok, n) = probe(max - d);
        if ok {
            found = Some((d, n));
            break;
        }
        lo = d;
        d *= 2.0;
    }
    let Some((mut hi, mut n)) = found else {
        return f32::MIN;
    };
    for _ in 0..8 {
        if n <= small {
            break;
        }
        let mid = 0.5 * (lo + hi);
        let (ok, m) = probe(max - mid);
        if ok {
            hi = mid;
            n = m;
        } else {
            lo = mid;
        }
    }
    max - hi
}

/// Calls `f(id, x)` for every `x >= t` of `xs`, in id order. Chunks with no such value are
/// skipped by one vectorised test, which is most of them when `t` is near the top.
fn for_each_at_least(xs: &[f32], t: f32, mut f: impl FnMut(u32, f32)) {
    const CHUNK: usize = 32;
    for (ci, c) in xs.chunks(CHUNK).enumerate() {
        let mut any = false;
        for &x in c {
            any |= x >= t;
        }
        if any {
            let base = ci * CHUNK;
            for (i, &x) in c.iter().enumerate() {
                if x >= t {
                    f((base + i) as u32, x);
                }
            }
        }
    }
}

/// A seed from OS entropy (std's per-process random hash keys) mixed with the clock.
fn entropy_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// splitmix64 step: the standard seeder for the xoshiro family.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna): small, fast, and the same stream on every platform.
#[derive(Clone, Debug)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Xoshiro256StarStar { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(params: SamplingParams, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            seed: Some(seed),
            ..params
        })
    }

    /// Pseudo-random logits shaped like a model's: a spread of values with a few clear leaders.
    fn fake_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256StarStar::from_seed(seed);
        (0..n)
            .map(|_| {
                let u = rng.next_f64() as f32;
                // Mostly in [-8, 4], a rare few up to ~20.
                if u > 0.9999 {
                    10.0 + 100_000.0 * (u - 0.9999)
                } else {
                    -8.0 + 12.0 * u
                }
            })
            .collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn splitmix64_and_xoshiro_match_reference_values() {
        // splitmix64 from state 0: the published first output.
        let mut st = 0u64;
        assert_eq!(splitmix64(&mut st), 0xE220_A839_7B1D_CDAF);
        // The stream of seed 42 is pinned: changing it breaks every user's reproducible runs.
        let mut rng = Xoshiro256StarStar::from_seed(42);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Xoshiro256StarStar::from_seed(42);
        assert_eq!(first, (0..3).map(|_| again.next_u64()).collect::<Vec<_>>());
        assert_eq!(first, PINNED_SEED42);
        let x = rng.next_f64();
        assert!((0.0..1.0).contains(&x));
    }
    /// Checked against an independent (Python) implementation of splitmix64 + xoshiro256**.
    const PINNED_SEED42: [u64; 3] = [
        1_546_998_764_402_558_742,
        6_990_951_692_964_543_102,
        12_544_586_762_248_559_009,
    ];

    #[test]
    fn argmax_lowest_index_wins_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 4]), 0);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[0.0, f32::INFINITY, 5.0]), 1);
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = fake_logits(50_000, 1);
        let mut s = Sampler::new(SamplingParams::greedy());
        for _ in 0..5 {
            assert_eq!(s.sample(&logits, &[1, 2, 3]), argmax(&logits));
        }
        // A tiny positive temperature is greedy too.
        let mut s = seeded(
            SamplingParams {
                temperature: 1e-7,
                ..Default::default()
            },
            3,
        );
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different() {
        let logits = fake_logits(1000, 2)
            .iter()
            .map(|v| v * 0.3)
            .collect::<Vec<_>>();
        let run = |seed: u64| {
            let mut s = seeded(SamplingParams::default(), seed);
            (0..100)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // And with every filter on.
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            ..Default::default()
        };
        let run = |seed: u64| {
            let mut s = seeded(params.clone(), seed);
            let mut hist = vec![5u32, 6, 7];
            for _ in 0..100 {
                let t = s.sample(&logits, &hist);
                hist.push(t);
            }
            hist
        };
        assert_eq!(run(11), run(11));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = fake_logits(30_000, 4);
        let mut s = seeded(
            SamplingParams {
                top_k: 1,
                temperature: 5.0,
                ..Default::default()
            },
            5,
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        }
    }

    #[test]
    fn tiny_top_p_is_greedy_with_and_without_top_k() {
        let logits = fake_logits(30_000, 6);
        for top_k in [0, 100] {
            let mut s = seeded(
                SamplingParams {
                    top_p: 1e-6,
                    top_k,
                    temperature: 3.0,
                    ..Default::default()
                },
                9,
            );
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), argmax(&logits));
            }
        }
    }

    #[test]
    fn top_p_keeps_the_exact_nucleus() {
        // Probabilities 0.4, 0.3, 0.2, 0.1 (ids shuffled): top_p 0.65 keeps {0.4, 0.3}.
        let logits = [0.2f32.ln(), 0.4f32.ln(), 0.1f32.ln(), 0.3f32.ln()];
        for top_k in [0, 3] {
            let mut s = seeded(
                SamplingParams {
                    top_p: 0.65,
                    top_k,
                    ..Default::default()
                },
                1,
            );
            let f = frequencies(&mut s, &logits, 20_000);
            assert_eq!(f[0], 0.0);
            assert_eq!(f[2], 0.0);
            assert!((f[1] - 0.4 / 0.7).abs() < 0.02, "{f:?}");
            assert!((f[3] - 0.3 / 0.7).abs() < 0.02, "{f:?}");
        }
    }

    /// The nucleus by the book: sort everything, keep the shortest prefix reaching `p`.
    fn naive_nucleus(logits: &[f32], p: f32) -> Vec<u32> {
        let mut c: Vec<Cand> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
            })
            .collect();
        c.sort_unstable_by(by_logit_desc);
        let max = c[0].logit as f64;
        let w: Vec<f64> = c.iter().map(|c| (c.logit as f64 - max).exp()).collect();
        let target = p as f64 * w.iter().sum::<f64>();
        let mut cum = 0.0;
        let mut ids = Vec::new();
        for (c, w) in c.iter().zip(w) {
            ids.push(c.id);
            cum += w;
            if cum >= target {
                break;
            }
        }
        ids.sort_unstable();
        ids
    }

    #[test]
    fn top_p_without_top_k_keeps_the_same_set_as_a_full_sort() {
        let spread = fake_logits(100_000, 12);
        // Flat: everything within one first-level bucket, so the boundary bucket is split again.
        let flat: Vec<f32> = spread.iter().map(|v| v * 0.001).collect();
        let equal = vec![0.25f32; 10_000];
        for (name, logits) in [("spread", &spread), ("flat", &flat), ("equal", &equal)] {
            for p in [0.1f32, 0.5, 0.9, 0.99] {
                let mut s = seeded(
                    SamplingParams {
                        top_p: p,
                        ..Default::default()
                    },
                    0,
                );
                let t = s.sample(logits, &[]);
                let mut got: Vec<u32> = s.cands.iter().map(|c| c.id).collect();
                got.sort_unstable();
                let want = naive_nucleus(logits, p);
                assert_eq!(got.len(), want.len(), "{name} top_p {p}");
                assert_eq!(got, want, "{name} top_p {p}");
                assert!(want.binary_search(&t).is_ok());
            }
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_with_renormalised_probabilities() {
        // Probabilities 0.4, 0.3, 0.2, 0.1 (ids shuffled); top_k 2 → 4/7 and 3/7.
        let logits = [0.2f32.ln(), 0.4f32.ln(), 0.1f32.ln(), 0.3f32.ln()];
        let mut s = seeded(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            21,
        );
        let f = frequencies(&mut s, &logits, 20_000);
        assert_eq!(f[0] + f[2], 0.0, "{f:?}");
        assert!((f[1] - 4.0 / 7.0).abs() < 0.02, "{f:?}");
        // On a large vocabulary: exactly the k largest.
        let logits = fake_logits(200_000, 13);
        let mut s = seeded(
            SamplingParams {
                top_k: 50,
                ..Default::default()
            },
            22,
        );
        s.sample(&logits, &[]);
        let mut sorted: Vec<f32> = logits.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let got: Vec<f32> = s.cands.iter().map(|c| c.logit).collect();
        assert_eq!(got, sorted[..50]);
    }

    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x -= 0.000_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert!(exp_nonpos(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 keeps p >= 0.1 → {0.5, 0.3, 0.15}.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut s = seeded(
            SamplingParams {
                min_p: 0.2,
                ..Default::default()
            },
            2,
        );
        let f = frequencies(&mut s, &logits, 20_000);
        assert_eq!(f[3], 0.0);
        assert!((f[0] - 0.5 / 0.95).abs() < 0.02, "{f:?}");
        assert!((f[2] - 0.15 / 0.95).abs() < 0.02, "{f:?}");
        // min_p 1 keeps only the top token.
        let mut s = seeded(
            SamplingParams {
                min_p: 1.0,
                ..Default::default()
            },
            2,
        );
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 0));
    }

    #[test]
    fn penalties_change_the_argmax() {
        let logits = [3.0f32, 2.5, -1.0, 0.0];
        // Repetition 2: token 0 seen → 1.5 < 2.5.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]), 1);
        assert_eq!(s.sample(&logits, &[2, 3]), 0);
        // Non-positive logits get multiplied (more negative): -1 * 2 = -2 < -1.5.
        let neg = [-1.0f32, -1.5, -5.0];
        assert_eq!(s.sample(&neg, &[0]), 1);
        // Frequency: 0.3 per occurrence; token 0 seen twice → 3.0 - 0.6 = 2.4 < 2.5.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]), 0);
        assert_eq!(s.sample(&logits, &[0, 0]), 1);
        // Presence: once, however often seen.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.6,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]), 1);
        assert_eq!(s.sample(&logits, &[1, 1, 1, 1]), 0);
        // Only the last `penalty_last_n` tokens count.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.6,
            penalty_last_n: 2,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0, 3, 3]), 0);
        assert_eq!(s.sample(&logits, &[3, 0, 3]), 1);
        // History ids beyond the vocabulary are ignored.
        assert_eq!(s.sample(&logits, &[99, 1_000_000]), 0);
    }

    #[test]
    fn sampling_matches_a_known_distribution() {
        let probs = [0.5f64, 0.3, 0.2];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32 + 1.7).collect();
        let mut s = seeded(SamplingParams::default(), 1234);
        let f = frequencies(&mut s, &logits, 20_000);
        for (got, want) in f.iter().zip(probs) {
            assert!((got - want).abs() < 0.015, "{f:?}");
        }
        // The same three tokens spread over several blocks of a large vocabulary, the rest -inf
        // or NaN: the block choice and the walk inside the block.
        let ids = [10usize, 1500, 2999];
        let mut big = vec![f32::NEG_INFINITY; 3000];
        for (k, &id) in ids.iter().enumerate() {
            big[id] = logits[k];
        }
        big[11] = f32::NAN;
        let f = frequencies(&mut s, &big, 20_000);
        for (&id, want) in ids.iter().zip(probs) {
            assert!((f[id] - want).abs() < 0.015, "token {id}: {}", f[id]);
        }
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn temperature_reshapes_the_distribution() {
        let probs = [0.5f64, 0.3, 0.2];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        // T = 0.5 squares the probabilities: 0.25 : 0.09 : 0.04.
        let mut s = seeded(
            SamplingParams {
                temperature: 0.5,
                ..Default::default()
            },
            77,
        );
        let f = frequencies(&mut s, &logits, 20_000);
        let want = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38];
        for (got, want) in f.iter().zip(want) {
            assert!((got - want).abs() < 0.015, "{f:?}");
        }
        // T = 100 is nearly uniform.
        let mut s = seeded(
            SamplingParams {
                temperature: 100.0,
                ..Default::default()
            },
            78,
        );
        let f = frequencies(&mut s, &logits, 20_000);
        assert!(f.iter().all(|&x| (x - 1.0 / 3.0).abs() < 0.02), "{f:?}");
    }

    #[test]
    fn validation_names_the_parameter() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
        let bad = |p: SamplingParams| p.validate().unwrap_err();
        let d = SamplingParams::default;
        assert_eq!(
            bad(SamplingParams { top_p: 1.5, ..d() }),
            "`top_p` must be in (0, 1], got 1.5"
        );
        assert_eq!(
            bad(SamplingParams { top_p: 0.0, ..d() }),
            "`top_p` must be in (0, 1], got 0"
        );
        assert!(bad(SamplingParams {
            temperature: -1.0,
            ..d()
        })
        .starts_with("`temperature`"));
        assert!(bad(SamplingParams {
            temperature: f32::NAN,
            ..d()
        })
        .starts_with("`temperature`"));
        assert!(bad(SamplingParams { min_p: 1.1, ..d() }).starts_with("`min_p`"));
        assert!(bad(SamplingParams {
            repetition_penalty: 0.0,
            ..d()
        })
        .starts_with("`repetition_penalty`"));
        assert!(bad(SamplingParams {
            presence_penalty: f32::INFINITY,
            ..d()
        })
        .starts_with("`presence_penalty`"));
        assert!(bad(SamplingParams {
            frequency_penalty: f32::NAN,
            ..d()
        })
        .starts_with("`frequency_penalty`"));
    }

    #[test]
    fn non_finite_logits_never_panic() {
        let all = [
            SamplingParams::greedy(),
            SamplingParams::default(),
            SamplingParams {
                top_k: 2,
                top_p: 0.9,
                min_p: 0.1,
                repetition_penalty: 1.3,
                frequency_penalty: 0.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
        ];
        for params in all {
            let mut s = seeded(params.clone(), 5);
            // NaN is never picked.
            let l = [f32::NAN, 1.0, f32::NAN, 0.5];
            for _ in 0..50 {
                let t = s.sample(&l, &[0, 1]);
                assert!(t == 1 || t == 3, "{params:?} gave {t}");
            }
            // All NaN / -inf / empty: token 0.
            assert_eq!(s.sample(&[f32::NAN; 5], &[1]), 0);
            assert_eq!(s.sample(&[f32::NEG_INFINITY; 5], &[]), 0);
            assert_eq!(s.sample(&[], &[3]), 0);
            // +inf takes all the mass.
            let l = [0.0, f32::INFINITY, 3.0, f32::NAN];
            for _ in 0..20 {
                assert_eq!(s.sample(&l, &[]), 1, "{params:?}");
            }
            // Two +inf share it; nothing else is picked.
            let l = [f32::INFINITY, 9.0, f32::INFINITY];
            for _ in 0..20 {
                let t = s.sample(&l, &[]);
                assert!(t == 0 || t == 2, "{params:?} gave {t}");
            }
        }
    }

    /// Timing on a 262k vocabulary (Gemma 3's): `cargo test --release -p supernode-engine --lib
    /// sampler::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_262k_vocab() {
        let logits = fake_logits(262_144, 99);
        let hist: Vec<u32> = (0..64).map(|i| i * 4099 % 262_144).collect();
        let cases: [(&str, SamplingParams); 6] = [
            ("greedy", SamplingParams::greedy()),
            ("temperature 1", SamplingParams::default()),
            (
                "top_k 40 + top_p 0.95 + T 0.8",
                SamplingParams {
                    top_k: 40,
                    top_p: 0.95,
                    temperature: 0.8,
                    ..Default::default()
                },
            ),
            (
                "top_p 0.9 (no top_k)",
                SamplingParams {
                    top_p: 0.9,
                    ..Default::default()
                },
            ),
            (
                "min_p 0.05 + penalties",
                SamplingParams {
                    min_p: 0.05,
                    repetition_penalty: 1.1,
                    frequency_penalty: 0.2,
                    presence_penalty: 0.2,
                    ..Default::default()
                },
            ),
            (
                "top_p 0.95 flat logits",
                SamplingParams {
                    top_p: 0.95,
                    ..Default::default()
                },
            ),
        ];
        for (name, params) in cases {
            let l = if name.contains("flat") {
                logits.iter().map(|v| v * 0.01).collect()
            } else {
                logits.clone()
            };
            let mut s = seeded(params, 1);
            // Best of 20 batches: the figure of an idle machine.
            let mut per = f64::MAX;
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                for _ in 0..10 {
                    std::hint::black_box(s.sample(&l, &hist));
                }
                per = per.min(t0.elapsed().as_secs_f64() * 1e3 / 10.0);
            }
            println!("{name:32} {per:.3} ms/call");
        }
    }
}
