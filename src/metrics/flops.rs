//! Analytic parameter counts and multiply-accumulates (MACs), per stage and in total.
//!
//! The counting rules are fvcore's (`FlopCountAnalysis`), which is what the reference papers
//! report as "FLOPs" (GFNet, HorNet, DynamicViT; `../shared/reference/official_models.json`):
//! - convolution: `out_h·out_w·c_out·(c_in/groups)·k²` (bias not counted);
//! - linear / matmul: `m·k·n` (bias not counted); attention counts `q·kᵀ` and `attn·v`;
//! - `nn.LayerNorm` / `F.layer_norm`: 5 per element (HorNet's channels-first LayerNorm is
//!   written with elementwise ops, which fvcore does not count);
//! - bilinear interpolation: 4 per output element;
//! - `rfft2` / `irfft2`: the references' handler, `N·C·⌈log2 N⌉` with `B, H, W, C = shape`
//!   and `N = H·W` taken from the operator's input shape as written. For GFNet the input is
//!   `[B, H, W, C]`; HorNet calls the FFT on `[B, C, H, W]`, so the handler reads `N = C·H`,
//!   `C = W` there — we reproduce that, it is what the official numbers contain;
//! - elementwise ops (GELU, adds, the complex filter multiply, softmax, pooling means) are free.
//!
//! Every family computes its cost from its arguments alone (no weights are allocated), with
//! these counts (the backbones' `ModelArgs::cost`).

use std::fmt;

/// Parameters and MACs of one stage (a group of layers in execution order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StageCost {
    pub name: String,
    pub params: u64,
    pub macs: u64,
}

/// A model's cost at one input resolution.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct CostReport {
    pub img_size: usize,
    pub stages: Vec<StageCost>,
    /// Elements of every counted layer's output for one image, summed: what training keeps for
    /// the backward pass, at least (elementwise ops are not counted).
    #[serde(skip)]
    pub activations: u64,
    /// Elements of the largest counted layer output for one image.
    #[serde(skip)]
    pub largest_activation: u64,
}

impl CostReport {
    pub fn new(img_size: usize) -> Self {
        Self { img_size, stages: Vec::new(), activations: 0, largest_activation: 0 }
    }

    /// Starts a new stage; subsequent counts go there.
    pub fn stage(&mut self, name: impl Into<String>) -> &mut Self {
        self.stages.push(StageCost { name: name.into(), params: 0, macs: 0 });
        self
    }

    fn cur(&mut self) -> &mut StageCost {
        if self.stages.is_empty() {
            self.stage("model");
        }
        self.stages.last_mut().expect("a stage")
    }

    pub fn params(&self) -> u64 {
        self.stages.iter().map(|s| s.params).sum()
    }

    pub fn macs(&self) -> u64 {
        self.stages.iter().map(|s| s.macs).sum()
    }

    pub fn gmacs(&self) -> f64 {
        self.macs() as f64 / 1e9
    }

    /// Adds `n` parameters (an embedding, a layer-scale vector, a filter...).
    pub fn add_params(&mut self, n: usize) -> &mut Self {
        self.cur().params += n as u64;
        self
    }

    /// Records a layer output of `n` elements per image.
    pub fn add_output(&mut self, n: usize) -> &mut Self {
        self.activations = self.activations.saturating_add(n as u64);
        self.largest_activation = self.largest_activation.max(n as u64);
        self
    }

    /// Adds `n` MACs that no primitive below describes.
    pub fn add_macs(&mut self, n: u64) -> &mut Self {
        self.cur().macs += n;
        self
    }

    /// A 2-D convolution producing an `out_hw[0]×out_hw[1]` map.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &mut self,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        groups: usize,
        bias: bool,
        out_hw: [usize; 2],
    ) -> &mut Self {
        let w = c_out * (c_in / groups) * kernel * kernel;
        self.add_params(w + if bias { c_out } else { 0 });
        self.add_output(c_out * out_hw[0] * out_hw[1]);
        self.add_macs((out_hw[0] * out_hw[1] * w) as u64)
    }

    /// A linear layer applied to `tokens` rows.
    pub fn linear(&mut self, d_in: usize, d_out: usize, bias: bool, tokens: usize) -> &mut Self {
        self.add_params(d_in * d_out + if bias { d_out } else { 0 });
        self.add_output(tokens * d_out);
        self.add_macs((tokens * d_in * d_out) as u64)
    }

    /// `nn.LayerNorm(dim)` over `rows` rows: `2·dim` parameters, 5 MACs per element.
    pub fn layer_norm(&mut self, dim: usize, rows: usize) -> &mut Self {
        self.add_params(2 * dim);
        self.add_output(rows * dim);
        self.add_macs(5 * (rows * dim) as u64)
    }

    /// A LayerNorm written with elementwise ops (HorNet's channels-first form): parameters only.
    pub fn layer_norm_elementwise(&mut self, dim: usize) -> &mut Self {
        self.add_params(2 * dim)
    }

    /// A batched matrix product `[m, k] × [k, n]`, `batch` times.
    pub fn matmul(&mut self, batch: usize, m: usize, k: usize, n: usize) -> &mut Self {
        self.add_output(batch * m * n);
        self.add_macs((batch * m * k * n) as u64)
    }

    /// One `rfft2`/`irfft2` call whose input has shape `shape` (batch dimension first).
    pub fn fft(&mut self, shape: [usize; 4]) -> &mut Self {
        self.add_output(shape[1] * shape[2] * shape[3]);
        self.add_macs(fft_macs(shape))
    }

    /// Bilinear resize producing `out_elems` elements.
    pub fn bilinear(&mut self, out_elems: usize) -> &mut Self {
        self.add_output(out_elems);
        self.add_macs(4 * out_elems as u64)
    }
}

/// The references' FFT handler: `B, H, W, C = shape; N = H·W; N·C·⌈log2 N⌉`.
pub fn fft_macs(shape: [usize; 4]) -> u64 {
    let [_, h, w, c] = shape;
    let n = (h * w) as u64;
    n * c as u64 * ceil_log2(n)
}

/// `⌈log2 n⌉` for `n ≥ 1` (`np.ceil(np.log2(n))`).
pub fn ceil_log2(n: u64) -> u64 {
    if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() as u64 }
}

impl fmt::Display for CostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14} {:>14} {:>10}", "stage", "params", "GMACs")?;
        for s in &self.stages {
            writeln!(f, "{:<14} {:>14} {:>10.4}", s.name, s.params, s.macs as f64 / 1e9)?;
        }
        write!(f, "{:<14} {:>14} {:>10.4}  (at {}×{})", "total", self.params(), self.gmacs(), self.img_size, self.img_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_log2_matches_numpy() {
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(112), 7);
        assert_eq!(ceil_log2(128), 7);
        assert_eq!(ceil_log2(196), 8);
    }

    #[test]
    fn stages_add_up() {
        let mut c = CostReport::new(32);
        c.stage("a").conv2d(3, 8, 3, 1, true, [32, 32]);
        c.stage("b").linear(8, 10, true, 1).layer_norm(8, 1);
        assert_eq!(c.params(), 3 * 8 * 9 + 8 + 80 + 10 + 16);
        assert_eq!(c.macs(), (32 * 32 * 8 * 27 + 80 + 40) as u64);
        assert_eq!(c.stages.len(), 2);
    }
}
