//! The decision protocol between a backbone and a controller ([`Controller`], [`DecisionPoint`],
//! [`Decision`], [`Trace`]), and the controlled execution of conv-BN-ReLU stacks. The protocol
//! sits beside the backbones that call it, so that backbones need nothing from the controllers
//! above them; `controllers` re-exports it.
//!
//! Controlled execution has real compute savings. Samples are carried as *parts*: the rows of the batch that share the previous layer's action,
//! with exactly the channels that layer computed. At each decision layer every (previous action,
//! new action) pair runs the conv with the weight slice `[0..c_out(new), 0..c_in(prev)]` on its
//! rows only, and the results are regrouped by the new action. Skipped channels are never
//! computed, and the MACs per image are counted from the shapes that actually ran.
//!
//! BatchNorm uses its running statistics in the controlled pass (also under autodiff: the
//! backbone is fine-tuned with frozen BN statistics, since per-action sub-batches can be tiny).

use anyhow::{Result, bail};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use crate::ModelBackend;
use crate::backbones::PrunableConv;
use crate::backbones::cnn::ConvBn;
use crate::nn::Linear;
use crate::nn::conv::global_avg_pool;

/// How a controller picks its actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sample from the policy (training rollouts).
    Sample,
    /// The most probable action (evaluation, self-critical baseline).
    Greedy,
}

/// One place in a backbone where a controller decides.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionPoint {
    /// 0-based position in execution order.
    pub index: usize,
    /// Name of the controlled layer (e.g. `features.2.conv`).
    pub name: String,
    /// Number of channel groups k: actions are `1..=k` groups computed.
    pub groups: usize,
    pub out_channels: usize,
    /// MACs of the full layer for one image.
    pub macs_full: u64,
}

impl DecisionPoint {
    /// Output channels computed when the first `action` of `groups` groups run (the last group
    /// takes the remainder).
    pub fn channels_for(&self, action: usize) -> usize {
        channels_for(self.out_channels, self.groups, action)
    }
}

/// Channels of the first `action` groups when `out` channels form `groups` groups.
pub fn channels_for(out: usize, groups: usize, action: usize) -> usize {
    let groups = groups.clamp(1, out.max(1));
    let action = action.clamp(1, groups);
    if action == groups { out } else { (out / groups) * action }
}

/// A controller's answer for a batch at one decision point.
#[derive(Debug, Clone)]
pub struct Decision<B: Backend> {
    /// Per image, the number of groups to compute, in `1..=k`.
    pub actions: Vec<usize>,
    /// Log-probability of each image's action, `[N]`.
    pub log_prob: Tensor<B, 1>,
    /// Policy entropy per image, `[N]`.
    pub entropy: Tensor<B, 1>,
}

/// An agent called at every decision point of a controlled forward pass.
pub trait Controller<B: Backend> {
    /// Number of channel groups per decision point (k).
    fn groups(&self) -> usize;
    /// Starts a new batch of `batch` images (clears recurrent state).
    fn reset(&mut self, batch: usize);
    /// Decides for every image of the batch. `observation` is the decision layer's input,
    /// global-average-pooled: `[N, C_in]` (channels that were skipped upstream are zero).
    fn decide(
        &mut self,
        point: &DecisionPoint,
        observation: Tensor<B, 2>,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) -> Result<Decision<B>>;
}

/// One decision as it happened.
#[derive(Debug, Clone)]
pub struct TraceStep<B: Backend> {
    pub point: DecisionPoint,
    /// `[N, C_in]`, detached.
    pub observation: Tensor<B, 2>,
    pub actions: Vec<usize>,
    pub log_prob: Tensor<B, 1>,
    /// MACs actually spent by this layer, per image.
    pub macs: Vec<u64>,
}

/// Everything a controlled forward pass decided and spent.
#[derive(Debug, Clone)]
pub struct Trace<B: Backend> {
    pub steps: Vec<TraceStep<B>>,
}

impl<B: Backend> Trace<B> {
    /// MACs spent per image over all decision layers.
    pub fn macs_per_image(&self) -> Vec<u64> {
        let n = self.steps.first().map(|s| s.macs.len()).unwrap_or(0);
        let mut out = vec![0u64; n];
        for s in &self.steps {
            for (o, m) in out.iter_mut().zip(&s.macs) {
                *o += m;
            }
        }
        out
    }

    /// Full-model MACs of the decision layers for one image.
    pub fn macs_full(&self) -> u64 {
        self.steps.iter().map(|s| s.point.macs_full).sum()
    }
}

struct Part<B: burn::tensor::backend::Backend> {
    /// Batch rows (original indices) held by this part, in tensor order.
    rows: Vec<usize>,
    x: Tensor<B, 4>,
}

fn index_tensor<B: burn::tensor::backend::Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// Global-average-pools every part into one `[N, c_full]` host-assembled tensor (zeros for
/// channels a part did not compute), rows in original batch order.
fn pooled_observation<B: ModelBackend>(
    parts: &[Part<B>],
    n: usize,
    c_full: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let mut obs = vec![0f32; n * c_full];
    for p in parts {
        let c = p.x.dims()[1];
        let pooled = global_avg_pool(p.x.clone().detach());
        let data = pooled.into_data().convert::<f32>();
        let vals = data.as_slice::<f32>().map_err(|e| anyhow::anyhow!("observation readback: {e:?}"))?;
        for (j, &row) in p.rows.iter().enumerate() {
            obs[row * c_full..row * c_full + c].copy_from_slice(&vals[j * c..(j + 1) * c]);
        }
    }
    Ok(Tensor::from_data(TensorData::new(obs, [n, c_full]), device))
}

/// Runs `layers` under `ctl`: one decision per layer. `pool(i, x)` applies whatever follows
/// layer `i` (max-pool or identity). Returns the final features global-average-pooled to
/// `[N, C_last]` (skipped channels zero) and the trace.
pub fn controlled_stack<B: ModelBackend>(
    layers: &[ConvBn<B>],
    points: &[PrunableConv],
    pool: &dyn Fn(usize, Tensor<B, 4>) -> Tensor<B, 4>,
    x: Tensor<B, 4>,
    ctl: &mut dyn Controller<B>,
    mode: Mode,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor<B, 2>, Trace<B>)> {
    if B::has_ragged_conv() && !B::ad_enabled(&x.device()) {
        controlled_stack_ragged(layers, points, pool, x, ctl, mode, rng)
    } else {
        controlled_stack_grouped(layers, points, pool, x, ctl, mode, rng)
    }
}

/// [`controlled_stack`] by groups of images that share their widths (see the module doc): the
/// execution under autodiff and on backends without a ragged convolution.
pub fn controlled_stack_grouped<B: ModelBackend>(
    layers: &[ConvBn<B>],
    points: &[PrunableConv],
    pool: &dyn Fn(usize, Tensor<B, 4>) -> Tensor<B, 4>,
    x: Tensor<B, 4>,
    ctl: &mut dyn Controller<B>,
    mode: Mode,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor<B, 2>, Trace<B>)> {
    check_points(layers, points)?;
    let device = x.device();
    let [n, c0, _, _] = x.dims();
    let k = ctl.groups();
    ctl.reset(n);
    let mut parts = vec![Part { rows: (0..n).collect(), x }];
    let mut c_full_in = c0;
    let mut steps = Vec::with_capacity(layers.len());
    for (t, (layer, pc)) in layers.iter().zip(points).enumerate() {
        let observation = pooled_observation(&parts, n, c_full_in, &device)?;
        let (point, decision) = decide_at(ctl, t, pc, observation.clone(), mode, rng)?;
        let mut macs = vec![0u64; n];
        // New parts keyed by action (index a-1): rows and tensors to concatenate.
        let mut next: Vec<(Vec<usize>, Vec<Tensor<B, 4>>)> = (0..k).map(|_| (Vec::new(), Vec::new())).collect();
        let kk = layer.conv.kernel_size() as u64;
        let folded = layer.folded(&device);
        for p in parts {
            let c_in = p.x.dims()[1] as u64;
            let m = p.rows.len();
            for a in 1..=k {
                let local: Vec<usize> = (0..m).filter(|&j| decision.actions[p.rows[j]] == a).collect();
                if local.is_empty() {
                    continue;
                }
                let xs = if local.len() == m {
                    p.x.clone()
                } else {
                    p.x.clone().select(0, index_tensor::<B>(&local, &device))
                };
                let c_out = point.channels_for(a);
                let y = folded.forward(xs, c_out);
                let [_, _, h, w] = y.dims();
                let cost = (h * w) as u64 * kk * kk * c_in * c_out as u64;
                let slot = &mut next[a - 1];
                for &j in &local {
                    macs[p.rows[j]] = cost;
                    slot.0.push(p.rows[j]);
                }
                // Pooling before the regrouping concatenates smaller tensors.
                slot.1.push(pool(t, y));
            }
        }
        parts = next
            .into_iter()
            .filter(|(rows, _)| !rows.is_empty())
            .map(|(rows, ts)| Part {
                rows,
                x: if ts.len() == 1 { ts.into_iter().next().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(ts, 0) },
            })
            .collect();
        steps.push(TraceStep { point, observation, actions: decision.actions, log_prob: decision.log_prob, macs });
        c_full_in = pc.out_channels;
    }
    // Pool, zero-pad to the full width, restore the batch order.
    let mut feats = Vec::with_capacity(parts.len());
    let mut order = Vec::with_capacity(n);
    for p in parts {
        let [m, c, _, _] = p.x.dims();
        let mut f = global_avg_pool(p.x);
        if c < c_full_in {
            f = Tensor::cat(vec![f, Tensor::zeros([m, c_full_in - c], &device)], 1);
        }
        feats.push(f);
        order.extend(p.rows);
    }
    let stacked = Tensor::cat(feats, 0);
    let mut inverse = vec![0usize; n];
    for (pos, &row) in order.iter().enumerate() {
        inverse[row] = pos;
    }
    let identity = inverse.iter().enumerate().all(|(i, &p)| i == p);
    let feats = if identity { stacked } else { stacked.select(0, index_tensor::<B>(&inverse, &device)) };
    Ok((feats, Trace { steps }))
}

/// [`controlled_stack`] at inference on a backend with a ragged convolution: the batch stays
/// one tensor in its own order, as wide as its widest image, with image `i`'s channels beyond
/// its width zero, and each layer is one call in which every image computes its own channel
/// block.
/// Same numbers as [`controlled_stack_grouped`] (the same per-image kernel runs), without its
/// gathers, concatenations and one call per (previous, new) action pair.
pub fn controlled_stack_ragged<B: ModelBackend>(
    layers: &[ConvBn<B>],
    points: &[PrunableConv],
    pool: &dyn Fn(usize, Tensor<B, 4>) -> Tensor<B, 4>,
    mut x: Tensor<B, 4>,
    ctl: &mut dyn Controller<B>,
    mode: Mode,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor<B, 2>, Trace<B>)> {
    check_points(layers, points)?;
    let device = x.device();
    let [n, c0, _, _] = x.dims();
    ctl.reset(n);
    let mut widths = vec![c0; n];
    let mut steps = Vec::with_capacity(layers.len());
    for (t, (layer, pc)) in layers.iter().zip(points).enumerate() {
        let (observation, for_controller) = twice(zero_padded(global_avg_pool(x.clone()), pc.in_channels));
        let (point, decision) = decide_at(ctl, t, pc, for_controller, mode, rng)?;
        let c_out: Vec<usize> = decision.actions.iter().map(|&a| point.channels_for(a)).collect();
        let y = layer.folded(&device).forward_ragged(x, &widths, &c_out);
        let [_, _, h, w] = y.dims();
        let kk = layer.conv.kernel_size() as u64;
        let macs = widths.iter().zip(&c_out).map(|(&ci, &co)| (h * w) as u64 * kk * kk * (ci * co) as u64).collect();
        x = pool(t, y);
        widths = c_out;
        steps.push(TraceStep { point, observation, actions: decision.actions, log_prob: decision.log_prob, macs });
    }
    let c_last = points.last().map_or(x.dims()[1], |p| p.out_channels);
    Ok((zero_padded(global_avg_pool(x), c_last), Trace { steps }))
}

/// Two tensors with `t`'s values that share no storage. A controller that reads its
/// observation back to the host gets it without a copy only when it holds the tensor alone (a
/// shared NdArray tensor is read element by element, about half a percent of a routed batch-1
/// forward); the trace keeps the other.
fn twice<B: ModelBackend>(t: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let device = t.device();
    let data = t.into_data();
    (Tensor::from_data(data.clone(), &device), Tensor::from_data(data, &device))
}

fn check_points<B: ModelBackend>(layers: &[ConvBn<B>], points: &[PrunableConv]) -> Result<()> {
    if points.len() != layers.len() {
        bail!("controlled forward: {} decision points for {} layers", points.len(), layers.len());
    }
    Ok(())
}

/// Decision `t` of `ctl` on `observation` (`[N, C_in]`), its actions checked.
fn decide_at<B: ModelBackend>(
    ctl: &mut dyn Controller<B>,
    t: usize,
    pc: &PrunableConv,
    observation: Tensor<B, 2>,
    mode: Mode,
    rng: &mut ChaCha8Rng,
) -> Result<(DecisionPoint, Decision<B>)> {
    let (n, k) = (observation.dims()[0], ctl.groups());
    let point =
        DecisionPoint { index: t, name: pc.name.clone(), groups: k, out_channels: pc.out_channels, macs_full: pc.macs };
    let decision = ctl.decide(&point, observation, mode, rng)?;
    if decision.actions.len() != n || decision.actions.iter().any(|&a| a == 0 || a > k) {
        bail!("controller returned invalid actions at {} (need {n} actions in 1..={k})", point.name);
    }
    Ok((point, decision))
}

/// `[N, C]` → `[N, width]`, the new columns zero (channels no image of the batch computed).
fn zero_padded<B: ModelBackend>(t: Tensor<B, 2>, width: usize) -> Tensor<B, 2> {
    let [n, c] = t.dims();
    if c >= width {
        return t;
    }
    let device = t.device();
    Tensor::cat(vec![t, Tensor::zeros([n, width - c], &device)], 1)
}

/// Permutes a 1-D tensor parameter.
fn permute1<B: ModelBackend>(p: Param<burn::tensor::Tensor<B, 1>>, idx: &Tensor<B, 1, Int>) -> Param<Tensor<B, 1>> {
    let idx = idx.clone();
    p.map(|t| t.select(0, idx))
}

/// Reorders every layer's output channels by the L2 norm of its filters (largest first),
/// permuting its BN and the next layer's input channels (or the classifier's inputs) to match:
/// the network computes exactly the same function, and RNP's "first a groups" are the most
/// important filters.
pub fn reorder_stack_by_filter_norm<B: ModelBackend>(layers: &mut [ConvBn<B>], head: &mut Linear<B>) {
    for i in 0..layers.len() {
        let w = layers[i].conv.weight.val();
        let [o, _, _, _] = w.dims();
        let norms = w.powf_scalar(2.0).reshape([o as i32, -1]).sum_dim(1).reshape([o]);
        let vals: Vec<f32> = norms.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let mut perm: Vec<usize> = (0..o).collect();
        perm.sort_by(|&a, &b| vals[b].partial_cmp(&vals[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        let device = layers[i].conv.weight.device();
        let idx = index_tensor::<B>(&perm, &device);
        let l = &mut layers[i];
        let conv_w = std::mem::replace(&mut l.conv.weight, Param::from_tensor(Tensor::zeros([1, 1, 1, 1], &device)));
        l.conv.weight = {
            let idx = idx.clone();
            conv_w.map(|t| t.select(0, idx))
        };
        if let Some(b) = l.conv.bias.take() {
            l.conv.bias = Some(permute1(b, &idx));
        }
        let bn = &mut l.bn;
        let dummy = || Param::from_tensor(Tensor::zeros([1], &device));
        bn.weight = permute1(std::mem::replace(&mut bn.weight, dummy()), &idx);
        bn.bias = permute1(std::mem::replace(&mut bn.bias, dummy()), &idx);
        bn.running_mean = burn::module::RunningState::new(bn.running_mean.value().select(0, idx.clone()));
        bn.running_var = burn::module::RunningState::new(bn.running_var.value().select(0, idx.clone()));
        if i + 1 < layers.len() {
            let next = &mut layers[i + 1].conv;
            let w = std::mem::replace(&mut next.weight, Param::from_tensor(Tensor::zeros([1, 1, 1, 1], &device)));
            next.weight = {
                let idx = idx.clone();
                w.map(|t| t.select(1, idx))
            };
        } else {
            let w = std::mem::replace(&mut head.weight, Param::from_tensor(Tensor::zeros([1, 1], &device)));
            head.weight = {
                let idx = idx.clone();
                w.map(|t| t.select(1, idx))
            };
        }
    }
}
