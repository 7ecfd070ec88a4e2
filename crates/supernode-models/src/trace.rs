//! The named-activation hook, as llama.cpp's `cb(cur, name, il)`: a forward pass shows each
//! intermediate activation it names to an optional callback, so that a test can compare any
//! layer with a reference, or two ways of computing it with each other.
//!
//! The names, in the order a block shows them (`layer` set):
//!
//! - `attn_norm`: the normalised input of the attention;
//! - inside the attention: `q`, `k`, `v` (GQA: after per-head norms, rope and rounding, as the
//!   attention uses them), or `q` and `kv` (MLA: the queries after rope, the cache rows);
//! - `attn_out` (the attention's output), `attn_post_norm` (where the block has post-norms),
//!   `ffn_inp` (the residual stream after the attention);
//! - `ffn_norm`, `ffn_out`, `ffn_post_norm` (where the block has post-norms);
//! - `l_out`: the residual stream after the block.
//!
//! Before the blocks, `inp_embd` (the scaled embeddings, `layer` unset); after them,
//! `result_norm` (every row after the final norm, `layer` unset: what embeddings pool; computed
//! only when a hook is set). Each value is `rows` rows, one per token of the batch, in batch
//! order.

/// One named activation.
pub struct Named<'a> {
    pub name: &'static str,
    /// The block it belongs to; `None` outside the blocks.
    pub layer: Option<usize>,
    /// Its rows (the batch's tokens); `values.len() / rows` values each.
    pub rows: usize,
    pub values: &'a [f32],
}

/// The hook of a forward pass, if any: what every layer is given to show its activations to.
#[derive(Default)]
pub struct Trace<'h> {
    hook: Option<&'h mut dyn FnMut(&Named<'_>)>,
}

impl<'h> Trace<'h> {
    /// A trace that shows every named activation to `hook`.
    pub fn new(hook: &'h mut dyn FnMut(&Named<'_>)) -> Trace<'h> {
        Trace { hook: Some(hook) }
    }

    /// Whether a hook is set (so that values computed only to be shown can be skipped).
    pub fn is_on(&self) -> bool {
        self.hook.is_some()
    }

    /// Shows `values` (`rows` rows) as `name` of layer `layer` to the hook, if there is one.
    #[inline]
    pub fn cb(&mut self, name: &'static str, layer: Option<usize>, rows: usize, values: &[f32]) {
        if let Some(hook) = self.hook.as_mut() {
            hook(&Named {
                name,
                layer,
                rows,
                values,
            });
        }
    }
}
