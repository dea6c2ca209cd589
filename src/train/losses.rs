//! Losses and accuracy.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};

/// Mean cross-entropy with label smoothing ε (PyTorch's `label_smoothing`: the target is
/// `(1-ε)·onehot + ε/K`).
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, smoothing: f64) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    let logp = log_softmax(logits, 1);
    let picked = logp.clone().gather(1, labels.reshape([n, 1])).reshape([n]);
    let nll = picked.neg().mean();
    if smoothing == 0.0 {
        return nll;
    }
    let uniform = logp.mean_dim(1).reshape([n]).neg().mean();
    nll * (1.0 - smoothing) + uniform * smoothing
}

/// Number of correct top-1 predictions.
pub fn correct<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> usize {
    let n = labels.dims()[0];
    let pred = logits.argmax(1).reshape([n]);
    pred.equal(labels).int().sum().into_scalar().elem::<i64>() as usize
}
