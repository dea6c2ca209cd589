//! Physical channel pruning of layers: the backbone families' `prune_channels` remove filters
//! (and the matching inputs of the next layer) by L1 norm, as Li et al.'s static pruning does.

use anyhow::{Result, bail};
use burn::module::{Param, RunningState};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::backbones::cnn::ConvBn;
use crate::nn::{BatchNorm2d, Conv2d, Linear};


fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// Keeps entries `idx` of `dim`. The result is a fresh leaf (trainable if the original was), so
/// an autodiff model pruned in place fine-tunes like a freshly built one.
fn select_param<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, dim: usize, idx: &[usize]) {
    let device = p.device();
    let taken = std::mem::replace(p, Param::from_tensor(Tensor::zeros([1; D], &device)));
    let idx = index_tensor::<B>(idx, &device);
    *p = taken.map(|t| {
        let trainable = t.is_require_grad();
        let t = t.select(dim, idx).detach();
        if trainable { t.require_grad() } else { t }
    });
}

fn select_running<B: Backend>(s: &mut RunningState<Tensor<B, 1>>, idx: &[usize]) {
    let v = s.value();
    let idx = index_tensor::<B>(idx, &v.device());
    *s = RunningState::new(v.select(0, idx));
}

/// Indices of the `keep` filters of `weight` (`[O, ...]`) with the largest L1 norm, in their
/// original order (ties: lower index first).
pub fn top_l1_filters<B: Backend>(weight: &Tensor<B, 4>, keep: usize) -> Vec<usize> {
    let [o, _, _, _] = weight.dims();
    let norms: Vec<f32> = weight
        .clone()
        .abs()
        .reshape([o as i32, -1])
        .sum_dim(1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let mut order: Vec<usize> = (0..o).collect();
    order.sort_by(|&a, &b| norms[b].partial_cmp(&norms[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(keep.clamp(1, o.max(1))).collect();
    kept.sort_unstable();
    kept
}

/// Keeps output channels `idx` of `conv` and the matching entries of `bn`.
pub fn prune_conv_out<B: Backend>(conv: &mut Conv2d<B>, bn: &mut BatchNorm2d<B>, idx: &[usize]) {
    select_param(&mut conv.weight, 0, idx);
    if let Some(b) = conv.bias.as_mut() {
        select_param(b, 0, idx);
    }
    select_param(&mut bn.weight, 0, idx);
    select_param(&mut bn.bias, 0, idx);
    select_running(&mut bn.running_mean, idx);
    select_running(&mut bn.running_var, idx);
}

/// Keeps input channels `idx` of a dense `conv`.
pub fn prune_conv_in<B: Backend>(conv: &mut Conv2d<B>, idx: &[usize]) {
    select_param(&mut conv.weight, 1, idx);
}

/// Keeps input features `idx` of `linear`.
pub fn prune_linear_in<B: Backend>(linear: &mut Linear<B>, idx: &[usize]) {
    select_param(&mut linear.weight, 1, idx);
}

/// Checks a keep vector against the output channels of the prunable convs.
pub fn check_keep(keep: &[usize], out_channels: &[usize]) -> Result<()> {
    if keep.len() != out_channels.len() {
        bail!("pruning plan has {} entries for {} prunable convs", keep.len(), out_channels.len());
    }
    for (i, (&k, &o)) in keep.iter().zip(out_channels).enumerate() {
        if k == 0 || k > o {
            bail!("pruning plan: conv {i} keeps {k} of {o} channels (must be in 1..={o})");
        }
    }
    Ok(())
}

/// Prunes a conv-BN-ReLU stack whose last layer feeds `head` (through global average pooling).
pub fn prune_stack<B: Backend>(layers: &mut [ConvBn<B>], head: &mut Linear<B>, keep: &[usize]) -> Result<()> {
    let outs: Vec<usize> = layers.iter().map(|l| l.conv.weight.dims()[0]).collect();
    check_keep(keep, &outs)?;
    // Li et al.'s "independent" strategy: every layer ranks its filters by their full L1 norm,
    // before any input channel is removed (so a layer's choice does not depend on the others').
    let kept: Vec<Vec<usize>> =
        layers.iter().zip(keep).map(|(l, &k)| top_l1_filters(&l.conv.weight.val(), k)).collect();
    for (i, idx) in kept.iter().enumerate() {
        let idx = idx.as_slice();
        let l = &mut layers[i];
        prune_conv_out(&mut l.conv, &mut l.bn, idx);
        match layers.get_mut(i + 1) {
            Some(next) => prune_conv_in(&mut next.conv, idx),
            None => prune_linear_in(head, idx),
        }
    }
    Ok(())
}
