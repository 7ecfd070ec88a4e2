//! The KV cache tensors: per layer, a pool of fixed-size blocks of key and value rows.
//!
//! This is storage only. Which blocks belong to which sequence is the engine's bookkeeping
//! (its block pool); the model's one attention layer writes and reads rows through a
//! [`Batch`]'s block tables. Layers may differ in geometry (e.g. MLA stores a latent).
//!
//! A layer of sparse attention (DeepSeek-V3.2's lightning indexer) also keeps its indexer's key
//! per token, in rows of its own beside the keys ([`KvLayerSpec::index_dim`]): paged by the same
//! slots, so blocks, preemption and prefix caching treat them as part of the token's KV.
//! A linear-attention layer (Gated DeltaNet) keeps no rows: its [`LayerKv::state`] holds one
//! fixed-size [`RecurrentState`] slot per running sequence instead (the engine gives a request
//! one slot number, the same in every such layer, and the [`Batch`] names it), and its
//! [`KvLayerSpec`] is [`KvLayerSpec::NONE`], so it costs nothing per token.
//!
//! Rows are f32, or f16 where the layer rounds its keys and values to f16 before writing them
//! ([`KvDType::for_rounding`]): as llama.cpp's f16 cache, at half the bytes.

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use supernode_kernels::ops::{KvRows, KvView};

use crate::layers::DeltaJournal;
use crate::{Batch, ModelError, Result};

/// Geometry and element type of one layer's cache rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayerSpec {
    pub n_kv_heads: usize,
    pub k_dim: usize,
    /// Values per head as the attention reads them.
    pub v_dim: usize,
    pub values: KvValues,
    pub dtype: KvDType,
    /// Values of a sparse-attention indexer's key per token (DeepSeek-V3.2's lightning
    /// indexer), in their own rows; 0 for none.
    pub index_dim: usize,
}

/// The element type of a layer's cache rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
}

impl KvDType {
    /// The element type for a layer that rounds (`f16_rounding`) or does not round its keys and
    /// values to f16 before caching them. Rounded (`Precision::Quantized`, llama.cpp's f16 KV
    /// cache), they are exactly f16 values: f16 rows hold them without loss, and the attention
    /// kernels read them back as the same f32 values, so the results are bit-identical to an f32
    /// cache while decode reads half the bytes and a memory budget holds twice the tokens.
    pub fn for_rounding(f16_rounding: bool) -> KvDType {
        if f16_rounding {
            KvDType::F16
        } else {
            KvDType::F32
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

/// Where a layer's values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvValues {
    /// In their own rows of `n_kv_heads * v_dim`.
    Stored,
    /// The first `v_dim` floats of each key row, not stored again: MLA, whose one "key head"
    /// is `[latent c, roped key]` and whose values are the latent `c`.
    InKeys,
}

impl KvLayerSpec {
    /// A layer without cache rows (linear attention: its memory is a [`RecurrentState`]).
    pub const NONE: KvLayerSpec = KvLayerSpec {
        n_kv_heads: 0,
        k_dim: 0,
        v_dim: 0,
        values: KvValues::Stored,
        dtype: KvDType::F32,
        index_dim: 0,
    };

    /// A multi-head latent attention layer: per token one row of the compressed latent
    /// (`kv_lora_rank`, normalised) and the shared roped key (`rope_dim`); the latent doubles
    /// as the values.
    pub fn mla(kv_lora_rank: usize, rope_dim: usize, dtype: KvDType) -> KvLayerSpec {
        KvLayerSpec {
            n_kv_heads: 1,
            k_dim: kv_lora_rank + rope_dim,
            v_dim: kv_lora_rank,
            values: KvValues::InKeys,
            dtype,
            index_dim: 0,
        }
    }

    /// [`KvLayerSpec::mla`] with the `index_dim` values of a lightning indexer's key per token
    /// (DeepSeek-V3.2's sparse attention over the latent cache).
    pub fn mla_indexed(
        kv_lora_rank: usize,
        rope_dim: usize,
        index_dim: usize,
        dtype: KvDType,
    ) -> KvLayerSpec {
        KvLayerSpec {
            index_dim,
            ..KvLayerSpec::mla(kv_lora_rank, rope_dim, dtype)
        }
    }

    /// DeepSeek-V4's attention: one shared head of `dim` whose keys are its values, and per
    /// token `aux` values of the compressors' state ([`KvLayerSpec::index_dim`]'s rows): the
    /// token's projections and its share of the compressed entry of its window.
    pub fn shared_kv(dim: usize, aux: usize, dtype: KvDType) -> KvLayerSpec {
        KvLayerSpec {
            n_kv_heads: 1,
            k_dim: dim,
            v_dim: dim,
            values: KvValues::InKeys,
            dtype,
            index_dim: aux,
        }
    }

    /// Values stored per token for the keys (`k`) and for the values (`v`).
    fn stored_widths(&self) -> (usize, usize) {
        let v = match self.values {
            KvValues::Stored => self.n_kv_heads * self.v_dim,
            KvValues::InKeys => 0,
        };
        (self.n_kv_heads * self.k_dim, v)
    }

    /// Values stored per token (keys and values of all heads, and the indexer's key), of
    /// `dtype` each.
    pub fn floats_per_token(&self) -> usize {
        let (k, v) = self.stored_widths();
        k + v + self.index_dim
    }

    /// Bytes stored per token.
    pub fn bytes_per_token(&self) -> usize {
        self.floats_per_token() * self.dtype.bytes()
    }
}

/// Element types whose all-zero bytes are the value zero.
trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for u16 {}

/// `len` zeros, allocated zeroed (the pages are touched only when used), or `None` when the
/// allocator cannot give that much (where `vec![0; len]` would abort the process).
fn zeroed_vec<T: ZeroBits>(len: usize) -> Option<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(len).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size; the memory comes zeroed from the global
    // allocator with exactly the layout `Vec` uses for `len` values of `T`, and zero bytes are
    // a valid `T` (`ZeroBits`).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        (!ptr.is_null()).then(|| Vec::from_raw_parts(ptr, len, len))
    }
}

/// Cache rows in a layer's element type.
#[derive(Debug)]
pub enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvData {
    /// `len` zeros, allocated zeroed (f16 as the bits of `u16` zeros), so that pages the cache
    /// never uses are never touched.
    /// A size the machine cannot give is an error naming it, not an abort.
    fn zeros(dtype: KvDType, len: usize) -> Result<KvData> {
        let failed = || {
            ModelError::Invalid(format!(
                "could not allocate {} MiB for a layer's KV cache: give the cache less memory \
                 (--kv-cache-mib) or a shorter context (--ctx)",
                (len * dtype.bytes()) >> 20
            ))
        };
        Ok(match dtype {
            KvDType::F32 => KvData::F32(zeroed_vec::<f32>(len).ok_or_else(failed)?),
            KvDType::F16 => KvData::F16(
                zeroed_vec::<u16>(len)
                    .ok_or_else(failed)?
                    .reinterpret_into(),
            ),
        })
    }

    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            KvData::F32(x) => x.len(),
            KvData::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `x` at `at ..`; f16 rows take values that are exactly f16 (a layer with f16 rows
    /// rounds them first), so nothing is lost.
    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            KvData::F32(d) => d[at..at + x.len()].copy_from_slice(x),
            KvData::F16(d) => {
                let d = &mut d[at..at + x.len()];
                d.convert_from_f32_slice(x);
                debug_assert!(
                    d.iter().zip(x).all(|(h, &f)| h.to_f32() == f || f.is_nan()),
                    "a value written to an f16 KV cache is not an f16 value"
                );
            }
        }
    }

    /// The `out.len()` values from `at` on, as f32.
    pub fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            KvData::F32(d) => out.copy_from_slice(&d[at..at + out.len()]),
            KvData::F16(d) => d[at..at + out.len()].convert_to_f32_slice(out),
        }
    }

    /// Zeros appended up to `len` values (none taken away); a size the machine cannot give is
    /// an error, not an abort.
    fn grow(&mut self, len: usize) -> Result<()> {
        let more = len.saturating_sub(self.len());
        let failed =
            |_| ModelError::Invalid(format!("could not grow a layer's KV cache to {len} values"));
        match self {
            KvData::F32(x) => {
                x.try_reserve(more).map_err(failed)?;
                x.resize(x.len() + more, 0.0);
            }
            KvData::F16(x) => {
                x.try_reserve(more).map_err(failed)?;
                x.resize(x.len() + more, f16::ZERO);
            }
        }
        Ok(())
    }

    /// The rows' memory: its start and its length in bytes.
    fn bytes_mut(&mut self) -> (*mut u8, usize) {
        match self {
            KvData::F32(x) => (x.as_mut_ptr().cast(), x.len() * 4),
            KvData::F16(x) => (x.as_mut_ptr().cast(), x.len() * 2),
        }
    }

    /// The rows as the attention kernels read them.
    pub fn rows(&self) -> KvRows<'_> {
        match self {
            KvData::F32(x) => KvRows::F32(x),
            KvData::F16(x) => KvRows::F16(x),
        }
    }
}

/// One layer's keys and values: `num_blocks * block_size` slots; and its recurrent state
/// slots where it is a linear-attention layer.
#[derive(Debug)]
pub struct LayerKv {
    pub spec: KvLayerSpec,
    pub k: KvData,
    pub v: KvData,
    /// The indexer's key rows (`spec.index_dim` per slot; empty without an indexer).
    pub index: KvData,
    pub state: RecurrentState,
}

/// A linear-attention layer's per-sequence state: `slots` slots of `width` f32 values each
/// (empty for other layers). A slot holds the state after exactly the positions its sequence
/// has computed; the layer zeroes it when a sequence starts at position 0.
#[derive(Debug, Default)]
pub struct RecurrentState {
    pub width: usize,
    pub slots: usize,
    pub data: Vec<f32>,
    /// Per slot (grown as needed), what a rollback of the last step's drafts needs: kept only
    /// by a step that carried drafts for the slot ([`crate::Batch::drafts`]), then used or
    /// dropped by [`crate::Model::rollback_drafts`].
    pub journals: Vec<DeltaJournal>,
}

impl RecurrentState {
    /// `slots` zeroed slots of `width` floats; a size the machine cannot give is an error.
    fn new(width: usize, slots: usize) -> Result<RecurrentState> {
        let len = width
            .checked_mul(slots)
            .filter(|n| n.checked_mul(4).is_some());
        let data = len.and_then(zeroed_vec::<f32>).ok_or_else(|| {
            ModelError::Invalid(format!(
                "could not allocate {slots} recurrent state slots of {width} floats: give the \
                 cache less memory (--kv-cache-mib) or fewer sequences (--max-num-seqs)"
            ))
        })?;
        Ok(RecurrentState {
            width,
            slots,
            data,
            journals: Vec::new(),
        })
    }

    /// Slot `i`'s values.
    pub fn slot_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.width..(i + 1) * self.width]
    }
}

/// One buffer of a cache ([`KvCache::regions`]), block after block: block `b`'s rows are the
/// `block_bytes` bytes from `addr + b * block_bytes`. What a transfer agent (NIXL) registers
/// to move whole blocks between two engines' caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRegion {
    pub addr: usize,
    pub len: usize,
    pub block_bytes: usize,
}

/// The whole cache.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub layers: Vec<LayerKv>,
    /// Recurrent state slots in each linear-attention layer (0: the model has none).
    pub num_state_slots: usize,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` slots for every layer.
    pub fn new(specs: &[KvLayerSpec], block_size: usize, num_blocks: usize) -> Result<KvCache> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Invalid(
                "KV cache needs at least one block of one slot".into(),
            ));
        }
        let slots = block_size
            .checked_mul(num_blocks)
            .ok_or_else(|| ModelError::Invalid("KV cache size overflows".into()))?;
        // Values per layer for rows of `width`; their bytes must be countable too.
        let len = |width: usize, dtype: KvDType| {
            slots
                .checked_mul(width)
                .filter(|n| n.checked_mul(dtype.bytes()).is_some())
                .ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "KV cache of {slots} slots of {width} values overflows"
                    ))
                })
        };
        let layers = specs
            .iter()
            .map(|&spec| {
                let (kw, vw) = spec.stored_widths();
                Ok(LayerKv {
                    spec,
                    k: KvData::zeros(spec.dtype, len(kw, spec.dtype)?)?,
                    v: KvData::zeros(spec.dtype, len(vw, spec.dtype)?)?,
                    index: KvData::zeros(spec.dtype, len(spec.index_dim, spec.dtype)?)?,
                    state: RecurrentState::default(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            block_size,
            num_blocks,
            layers,
            num_state_slots: 0,
        })
    }

    /// The cache with `slots` recurrent state slots in every layer whose state width
    /// (`widths[layer]`, [`crate::Model::state_widths`]) is not 0.
    pub fn with_state_slots(mut self, widths: &[usize], slots: usize) -> Result<KvCache> {
        if widths.len() != self.layers.len() {
            return Err(ModelError::Invalid(format!(
                "{} state widths for {} layers",
                widths.len(),
                self.layers.len()
            )));
        }
        if widths.iter().any(|&w| w > 0) {
            if slots == 0 {
                return Err(ModelError::Invalid(
                    "a model with linear-attention layers needs at least one state slot".into(),
                ));
            }
            for (layer, &w) in self.layers.iter_mut().zip(widths) {
                if w > 0 {
                    layer.state = RecurrentState::new(w, slots)?;
                }
            }
            self.num_state_slots = slots;
        }
        Ok(self)
    }

    /// Grows every layer to `num_blocks` blocks (nothing if it has as many already): the rows
    /// held keep their slots, the new blocks are zeros. For a cache that grows with one
    /// sequence instead of being sized up front (the engine's draft model keeps one per
    /// request). Recurrent state slots are not changed.
    pub fn grow(&mut self, num_blocks: usize) -> Result<()> {
        if num_blocks <= self.num_blocks {
            return Ok(());
        }
        let slots = self
            .block_size
            .checked_mul(num_blocks)
            .ok_or_else(|| ModelError::Invalid("KV cache size overflows".into()))?;
        for layer in &mut self.layers {
            let (kw, vw) = layer.spec.stored_widths();
            let len = |w: usize| {
                slots
                    .checked_mul(w)
                    .ok_or_else(|| ModelError::Invalid("KV cache size overflows".into()))
            };
            layer.k.grow(len(kw)?)?;
            layer.v.grow(len(vw)?)?;
            layer.index.grow(len(layer.spec.index_dim)?)?;
        }
        self.num_blocks = num_blocks;
        Ok(())
    }

    /// Every non-empty buffer of rows (each layer's keys, values and indexer keys, in that
    /// order), for moving blocks in and out of the cache by address. The addresses stay valid
    /// while the cache lives and is not grown ([`KvCache::grow`]); writing through them is only
    /// sound for blocks nobody computes with meanwhile (the engine's block leases).
    pub fn regions(&mut self) -> Vec<KvRegion> {
        let blocks = self.num_blocks;
        let mut out = Vec::new();
        for layer in &mut self.layers {
            for d in [&mut layer.k, &mut layer.v, &mut layer.index] {
                if d.is_empty() {
                    continue;
                }
                let (ptr, len) = d.bytes_mut();
                out.push(KvRegion {
                    addr: ptr as usize,
                    len,
                    block_bytes: len / blocks,
                });
            }
        }
        out
    }

    /// Bytes of one state slot over all layers.
    pub fn bytes_per_state_slot(widths: &[usize]) -> usize {
        widths.iter().sum::<usize>() * 4
    }

    /// Bytes per token over all layers.
    pub fn bytes_per_token(specs: &[KvLayerSpec]) -> usize {
        specs.iter().map(KvLayerSpec::bytes_per_token).sum()
    }

    /// Checks that every token of `batch` has a valid slot and id, so the forward pass can
    /// index without further checks.
    pub fn check_batch(&self, batch: &Batch, vocab_size: usize) -> Result<()> {
        let n = batch.tokens.len();
        if batch.positions.len() != n || batch.seq_of.len() != n {
            return Err(ModelError::Invalid("batch arrays differ in length".into()));
        }
        for t in 0..n {
            if batch.tokens[t] as usize >= vocab_size {
                return Err(ModelError::Invalid(format!(
                    "token id {} is outside the vocabulary of {vocab_size}",
                    batch.tokens[t]
                )));
            }
            let table = batch.block_tables.get(batch.seq_of[t]).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "token {t} names sequence {}, which is not in the batch",
                    batch.seq_of[t]
                ))
            })?;
            let block = table
                .get(batch.positions[t] / self.block_size)
                .ok_or_else(|| {
                    ModelError::Invalid(format!("position {} has no KV block", batch.positions[t]))
                })?;
            if *block as usize >= self.num_blocks {
                return Err(ModelError::Invalid(format!(
                    "KV block {block} does not exist"
                )));
            }
        }
        for table in batch.block_tables {
            if let Some(b) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
                return Err(ModelError::Invalid(format!("KV block {b} does not exist")));
            }
        }
        if self.num_state_slots > 0 {
            self.check_state_slots(batch)?;
        }
        let seqs = batch.block_tables.len();
        for (what, per_seq) in [
            ("drafts", batch.drafts),
            ("chunked_until", batch.chunked_until),
        ] {
            if !per_seq.is_empty() && per_seq.len() != seqs {
                return Err(ModelError::Invalid(format!(
                    "{} {what} entries for {seqs} sequences",
                    per_seq.len()
                )));
            }
        }
        if let Some(&r) = batch.logits_for.iter().find(|&&r| r >= n) {
            return Err(ModelError::Invalid(format!(
                "logits requested for row {r} of a {n}-token batch"
            )));
        }
        Ok(())
    }
}

impl KvCache {
    /// For a model with recurrent state: each sequence has its own existing slot, and its
    /// tokens come in order of consecutive positions (the state continues from the last one).
    fn check_state_slots(&self, batch: &Batch) -> Result<()> {
        let seqs = batch.block_tables.len();
        if batch.state_slots.len() != seqs {
            return Err(ModelError::Invalid(format!(
                "{} state slots for {seqs} sequences",
                batch.state_slots.len()
            )));
        }
        let mut used = vec![false; self.num_state_slots];
        for &slot in batch.state_slots {
            match used.get_mut(slot) {
                None => {
                    return Err(ModelError::Invalid(format!(
                        "state slot {slot} does not exist"
                    )))
                }
                Some(true) => {
                    return Err(ModelError::Invalid(format!(
                        "state slot {slot} is given to two sequences"
                    )))
                }
                Some(u) => *u = true,
            }
        }
        let mut next: Vec<Option<usize>> = vec![None; seqs];
        for (t, (&q, &pos)) in batch.seq_of.iter().zip(batch.positions).enumerate() {
            if let Some(want) = next[q] {
                if pos != want {
                    return Err(ModelError::Invalid(format!(
                        "token {t}: sequence {q} continues at position {pos}, not {want} \
                         (a recurrent state needs consecutive positions)"
                    )));
                }
            }
            next[q] = Some(pos + 1);
        }
        Ok(())
    }
}

impl LayerKv {
    /// Writes the key and value rows of one token (all KV heads) into `slot`; `v` is empty
    /// when the values live in the keys.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let (kw, vw) = self.spec.stored_widths();
        assert_eq!(
            (k.len(), v.len()),
            (kw, vw),
            "LayerKv::write: bad row sizes"
        );
        self.k.write(slot * kw, k);
        self.v.write(slot * vw, v);
    }

    /// Writes the indexer's key of one token into `slot` (rounded to f16 first where the rows
    /// are f16, as every row of such a layer is).
    pub fn write_index(&mut self, slot: usize, key: &[f32]) {
        let d = self.spec.index_dim;
        assert_eq!(key.len(), d, "LayerKv::write_index: bad row size");
        self.index.write(slot * d, key);
    }

    /// Reads the key row of `slot` (all KV heads) into `out`.
    pub fn read_key(&self, slot: usize, out: &mut [f32]) {
        let (kw, _) = self.spec.stored_widths();
        self.k.read(slot * kw, &mut out[..kw]);
    }

    /// Writes `values` into the index row of `slot` from its value `offset` on (a layer that
    /// keeps several things per token in those rows: DeepSeek-V4's compressors).
    pub fn write_index_at(&mut self, slot: usize, offset: usize, values: &[f32]) {
        let d = self.spec.index_dim;
        assert!(
            offset + values.len() <= d,
            "LayerKv::write_index_at: out of the row"
        );
        self.index.write(slot * d + offset, values);
    }

    /// Reads `out.len()` values of the index row of `slot` from its value `offset` on.
    pub fn read_index_at(&self, slot: usize, offset: usize, out: &mut [f32]) {
        let d = self.spec.index_dim;
        assert!(
            offset + out.len() <= d,
            "LayerKv::read_index_at: out of the row"
        );
        self.index.read(slot * d + offset, out);
    }

    /// The indexer's keys as the kernels read them: one "head" of `index_dim` per slot.
    pub fn index_view(&self, block_size: usize) -> KvView<'_> {
        KvView {
            k: self.index.rows(),
            v: self.index.rows(),
            block_size,
            n_kv_heads: 1,
            k_dim: self.spec.index_dim,
            v_dim: self.spec.index_dim,
        }
    }

    /// A read-only view for the attention kernel. When the values live in the keys, the view's
    /// values are the key rows (stride `k_dim`), of which the kernel reads the first
    /// `AttnShape::v_dim`.
    pub fn view(&self, block_size: usize) -> KvView<'_> {
        let (v, v_dim) = match self.spec.values {
            KvValues::Stored => (&self.v, self.spec.v_dim),
            KvValues::InKeys => (&self.k, self.spec.k_dim),
        };
        KvView {
            k: self.k.rows(),
            v: v.rows(),
            block_size,
            n_kv_heads: self.spec.n_kv_heads,
            k_dim: self.spec.k_dim,
            v_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_keeps_the_rows_and_adds_zeroed_blocks() {
        for dtype in [KvDType::F32, KvDType::F16] {
            let spec = KvLayerSpec {
                n_kv_heads: 2,
                k_dim: 4,
                v_dim: 3,
                values: KvValues::Stored,
                dtype,
                index_dim: 0,
            };
            let mut kv = KvCache::new(&[spec; 2], 4, 1).unwrap();
            let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
            let v: Vec<f32> = (0..6).map(|i| -(i as f32)).collect();
            kv.layers[1].write(3, &k, &v);
            kv.grow(3).unwrap();
            kv.grow(2).unwrap();
            assert_eq!(kv.num_blocks, 3);
            let l = &kv.layers[1];
            assert_eq!((l.k.len(), l.v.len(), l.index.len()), (12 * 8, 12 * 6, 0));
            let f = |d: &KvData| -> Vec<f32> {
                match d {
                    KvData::F32(x) => x.clone(),
                    KvData::F16(x) => x.iter().map(|h| h.to_f32()).collect(),
                }
            };
            let (ks, vs) = (f(&l.k), f(&l.v));
            assert_eq!(&ks[24..32], &k[..]);
            assert_eq!(&vs[18..24], &v[..]);
            assert!(ks[32..].iter().chain(&vs[24..]).all(|&x| x == 0.0));
            // The new slots take rows.
            kv.layers[0].write(11, &k, &v);
        }
    }

    /// MLA keeps the latent and the roped key per token and layer, nothing per head: DeepSeek-V3
    /// (61 layers, rank 512, rope 64) stores 576 floats per layer where full K/V would be
    /// 128 heads × (192 + 128).
    #[test]
    fn mla_spec_stores_latent_and_rope_key_only() {
        let spec = KvLayerSpec::mla(512, 64, KvDType::F32);
        assert_eq!(spec.floats_per_token(), 512 + 64);
        let specs = vec![spec; 61];
        assert_eq!(KvCache::bytes_per_token(&specs), 61 * 576 * 4);
        let full = KvLayerSpec {
            n_kv_heads: 128,
            k_dim: 192,
            v_dim: 128,
            values: KvValues::Stored,
            dtype: KvDType::F32,
            index_dim: 0,
        };
        assert_eq!(
            KvCache::bytes_per_token(&vec![full; 61]),
            61 * 128 * 320 * 4
        );

        let mut cache = KvCache::new(&[KvLayerSpec::mla(3, 2, KvDType::F32)], 2, 2).unwrap();
        let layer = &mut cache.layers[0];
        assert_eq!((layer.k.len(), layer.v.len()), (4 * 5, 0));
        layer.write(3, &[1.0, 2.0, 3.0, 4.0, 5.0], &[]);
        let view = layer.view(2);
        // The values are read from the key rows: latent first.
        let KvRows::F32(v) = view.v else {
            panic!("f32 rows expected")
        };
        assert_eq!((view.v_dim, &v[15..18]), (5, &[1.0, 2.0, 3.0][..]));
    }

    /// Sizes from a crafted file cannot wrap the cache's length around.
    #[test]
    fn unallocatable_cache_sizes_are_errors() {
        // 2^46 bytes: no machine here has 64 TiB, and the size does not overflow.
        let spec = KvLayerSpec {
            n_kv_heads: 1 << 10,
            k_dim: 1 << 10,
            v_dim: 1,
            values: KvValues::Stored,
            dtype: KvDType::F32,
            index_dim: 0,
        };
        let err = KvCache::new(&[spec], 1 << 12, 1 << 12).unwrap_err();
        assert!(err.to_string().contains("--kv-cache-mib"), "{err}");
        assert_eq!(zeroed_vec::<u16>(3), Some(vec![0u16; 3]));
        assert_eq!(zeroed_vec::<f32>(0), Some(Vec::new()));
    }

    #[test]
    fn overflowing_cache_sizes_are_errors() {
        let huge = KvLayerSpec {
            n_kv_heads: 1 << 24,
            k_dim: 1 << 24,
            v_dim: 1,
            values: KvValues::Stored,
            dtype: KvDType::F32,
            index_dim: 0,
        };
        let err = KvCache::new(&[huge], 1 << 16, 1 << 8).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    /// f16 rows take half the bytes of f32 ones, hold f16 values without loss, and serve both
    /// stored values and values in the keys.
    #[test]
    fn f16_rows_halve_the_bytes_and_keep_the_values() {
        assert_eq!(KvDType::for_rounding(true), KvDType::F16);
        assert_eq!(KvDType::for_rounding(false), KvDType::F32);
        let gqa = |dtype| KvLayerSpec {
            n_kv_heads: 2,
            k_dim: 3,
            v_dim: 2,
            values: KvValues::Stored,
            dtype,
            index_dim: 0,
        };
        let (f32_spec, f16_spec) = (gqa(KvDType::F32), gqa(KvDType::F16));
        assert_eq!(f32_spec.bytes_per_token(), (6 + 4) * 4);
        assert_eq!(f16_spec.bytes_per_token(), (6 + 4) * 2);
        let mla = KvLayerSpec::mla(512, 64, KvDType::F16);
        assert_eq!(KvCache::bytes_per_token(&[mla; 61]), 61 * 576 * 2);

        let k = [1.5, -0.0, 65504.0, 2f32.powi(-24), -2.25, 1024.0];
        let v = [f16::from_f32(0.1).to_f32(), -7.0, 3.0, 0.5];
        let mut cache =
            KvCache::new(&[f16_spec, KvLayerSpec::mla(3, 3, KvDType::F16)], 2, 3).unwrap();
        let widened = |rows: KvRows| match rows {
            KvRows::F16(x) => x.iter().map(|h| h.to_f32().to_bits()).collect::<Vec<_>>(),
            KvRows::F32(_) => panic!("f16 rows expected"),
        };
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let layer = &mut cache.layers[0];
        assert_eq!((layer.k.len(), layer.v.len()), (6 * 6, 6 * 4));
        layer.write(4, &k, &v);
        let view = layer.view(2);
        assert_eq!(widened(view.k)[24..30], bits(&k)[..]);
        assert_eq!(widened(view.v)[16..20], bits(&v)[..]);
        let layer = &mut cache.layers[1];
        layer.write(5, &k, &[]);
        let view = layer.view(2);
        assert_eq!(view.v_dim, 6);
        assert_eq!(widened(view.v)[30..33], bits(&k[..3])[..]);
    }

    /// DeepSeek-V3.2's layer keeps the indexer's key beside the latent: 512 + 64 + 128 values
    /// per token and layer, counted in the bytes a memory budget divides by; the keys have
    /// rows of their own, paged by the same slots.
    #[test]
    fn indexed_mla_keeps_the_indexer_keys_per_slot() {
        let spec = KvLayerSpec::mla_indexed(512, 64, 128, KvDType::F16);
        assert_eq!(spec.floats_per_token(), 512 + 64 + 128);
        assert_eq!(KvCache::bytes_per_token(&[spec; 61]), 61 * 704 * 2);
        let mut cache =
            KvCache::new(&[KvLayerSpec::mla_indexed(3, 2, 4, KvDType::F32)], 2, 3).unwrap();
        let layer = &mut cache.layers[0];
        assert_eq!(
            (layer.k.len(), layer.v.len(), layer.index.len()),
            (30, 0, 24)
        );
        layer.write(5, &[1.0, 2.0, 3.0, 4.0, 5.0], &[]);
        layer.write_index(5, &[6.0, 7.0, 8.0, 9.0]);
        let view = layer.index_view(2);
        assert_eq!((view.k_dim, view.n_kv_heads), (4, 1));
        let KvRows::F32(rows) = view.k else {
            panic!("f32 rows expected")
        };
        assert_eq!(&rows[20..24], &[6.0, 7.0, 8.0, 9.0]);
        let KvRows::F32(keys) = layer.view(2).k else {
            panic!("f32 rows expected")
        };
        assert_eq!(&keys[25..30], &[1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
