//! Named weight lookup with shape checks, over the tensors of any file format.
//!
//! Tensor names are GGUF's (the safetensors loader maps HF names into them). A required tensor
//! that is missing or has the wrong shape is an error naming it; an optional one that is
//! absent is `None` — never a silent fallback on a real error.

use std::collections::HashMap;
use std::sync::Arc;

use supernode_kernels::quant::dequantize_row;
use supernode_kernels::DType;

use crate::layers::{Embedding, Linear, RmsNorm, StackedLinear};
use crate::numerics::Numerics;
use crate::{ModelError, Result, Storage, Tensor};

/// The tensors of a model file, by GGUF name.
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// Given to every layer built from these weights.
    numerics: Numerics,
}

impl Weights {
    pub fn new(tensors: Vec<Tensor>, numerics: Numerics) -> Weights {
        Weights {
            map: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
            numerics,
        }
    }

    /// The numerics of the layers built from these weights.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// A projection over `w` (e.g. a tied embedding reused as the output head).
    pub fn linear_from(&self, w: Tensor, bias: Option<Vec<f32>>) -> Linear {
        Linear::new(w, bias, self.numerics)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| ModelError::Tensor {
            name: name.to_string(),
            msg: "missing from the model file".into(),
        })
    }

    fn check_shape(t: &Tensor, want: &[usize]) -> Result<()> {
        if t.shape != want {
            return Err(ModelError::Tensor {
                name: t.name.clone(),
                msg: format!("has shape {:?}, expected {:?} (ggml order)", t.shape, want),
            });
        }
        Ok(())
    }

    /// A 1-D tensor dequantised to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.require(name)?;
        Self::check_shape(t, &[len])?;
        to_f32(t)
    }

    /// `{prefix}.weight` as a `rows × cols` matrix, with `{prefix}.bias` if present.
    pub fn linear(&self, prefix: &str, rows: usize, cols: usize) -> Result<Linear> {
        let w = self.require(&format!("{prefix}.weight"))?;
        Self::check_shape(w, &[cols, rows])?;
        check_row_blocks(w)?;
        let bias = match self.get(&format!("{prefix}.bias")) {
            Some(b) => {
                Self::check_shape(b, &[rows])?;
                Some(to_f32(b)?)
            }
            None => None,
        };
        Ok(self.linear_from(w.clone(), bias))
    }

    /// The rows `pick` (in that order) of the `rows × cols` matrix `name`, dequantised to f32,
    /// as a projection: a fused tensor whose rows a layer regroups (Qwen3-Next's per-key-head
    /// `[q, k, v, z]`).
    pub fn linear_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        pick: &[usize],
    ) -> Result<Linear> {
        let all = self.values(name, &[cols, rows])?;
        let mut bytes = Vec::with_capacity(pick.len() * cols * 4);
        for &r in pick {
            let row = all
                .get(r * cols..(r + 1) * cols)
                .ok_or_else(|| ModelError::Tensor {
                    name: name.to_string(),
                    msg: format!("has no row {r}"),
                })?;
            bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        let t = Tensor {
            name: name.to_string(),
            dtype: DType::F32,
            shape: vec![cols, pick.len()],
            storage: Storage::Owned(Arc::new(bytes)),
        };
        Ok(self.linear_from(t, None))
    }

    /// `{prefix}.weight` as a `rows × cols` matrix if the file has it.
    pub fn opt_linear(&self, prefix: &str, rows: usize, cols: usize) -> Result<Option<Linear>> {
        if self.get(&format!("{prefix}.weight")).is_none() {
            return Ok(None);
        }
        self.linear(prefix, rows, cols).map(Some)
    }

    /// `{prefix}.weight` as `count` stacked `rows × cols` matrices (ggml `[cols, rows, count]`).
    pub fn stacked(
        &self,
        prefix: &str,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<StackedLinear> {
        let w = self.stacked_tensor(prefix, count, rows, cols)?;
        Ok(StackedLinear::new(w, self.numerics))
    }

    /// `{prefix}.weight`, checked to be `count` stacked `rows × cols` matrices of whole blocks.
    fn stacked_tensor(
        &self,
        prefix: &str,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor> {
        let w = self.require(&format!("{prefix}.weight"))?;
        Self::check_shape(w, &[cols, rows, count])?;
        check_row_blocks(w)?;
        Ok(w.clone())
    }

    /// A mixture of experts' `count` stacked `rows × cols` experts `{prefix}.weight`: as
    /// [`Weights::stacked`], each expert packed for this CPU's kernels where the precision
    /// calls for it ([`StackedLinear::new_packed`]).
    pub fn experts(
        &self,
        prefix: &str,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<StackedLinear> {
        let w = self.stacked_tensor(prefix, count, rows, cols)?;
        Ok(StackedLinear::new_packed(w, self.numerics))
    }

    /// `count` stacked `rows × cols` matrices from f32 values (`count * rows * cols`, matrix
    /// by matrix), e.g. per-head slices a loader rearranged.
    pub fn stacked_from_f32(
        &self,
        name: &str,
        values: &[f32],
        count: usize,
        rows: usize,
        cols: usize,
    ) -> StackedLinear {
        debug_assert_eq!(values.len(), count * rows * cols);
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor {
            name: name.to_string(),
            dtype: DType::F32,
            shape: vec![cols, rows, count],
            storage: Storage::Owned(Arc::new(bytes)),
        };
        StackedLinear::new(t, self.numerics)
    }

    /// Tensor `name` of ggml shape `shape`, dequantised to f32.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.require(name)?;
        Self::check_shape(t, shape)?;
        to_f32(t)
    }

    /// An RMSNorm weight `{name}` of `len` elements.
    pub fn rms_norm(&self, name: &str, len: usize, eps: f32, w_offset: f32) -> Result<RmsNorm> {
        Ok(RmsNorm {
            w: self.vector(name, len)?,
            eps,
            w_offset,
        })
    }

    /// An embedding table of `vocab` rows of `dim`.
    pub fn embedding(&self, name: &str, vocab: usize, dim: usize) -> Result<Embedding> {
        let t = self.require(name)?;
        Self::check_shape(t, &[dim, vocab])?;
        check_row_blocks(t)?;
        Ok(Embedding::new(t.clone()))
    }
}

fn check_row_blocks(t: &Tensor) -> Result<()> {
    if t.dtype.row_bytes(t.cols()).is_none() {
        return Err(ModelError::Tensor {
            name: t.name.clone(),
            msg: format!(
                "rows of {} elements are not whole {} blocks",
                t.cols(),
                t.dtype.name()
            ),
        });
    }
    Ok(())
}

/// Dequantises a whole tensor (e.g. a norm weight) to f32.
fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    check_row_blocks(t)?;
    let mut out = vec![0.0; t.numel()];
    let row_bytes = t.dtype.row_bytes(t.cols()).unwrap_or(0);
    for (dst, src) in out
        .chunks_exact_mut(t.cols())
        .zip(t.bytes().chunks_exact(row_bytes))
    {
        dequantize_row(t.dtype, src, dst);
    }
    Ok(out)
}
