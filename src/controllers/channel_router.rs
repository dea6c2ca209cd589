//! RNP's channel router (Lin et al., NeurIPS 2017): per decision layer an encoder
//! `encoders.{t}` (Linear C_in_t → d) of the layer's pooled input, a GRU cell shared over
//! layers carrying state from layer to layer, and a head (Linear d → k) giving the distribution
//! over "compute the first a of k channel groups". An optional value head (Linear d → 1)
//! provides the learned baseline for REINFORCE.

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, sigmoid, softmax, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Controller, ControllerConfig, Decision, DecisionPoint, Mode};
use crate::backbones::PrunableConv;
use crate::nn::Linear;
use crate::nn::layers::torch_default_uniform;

/// A GRU cell with PyTorch's parameter names and gate order (r, z, n).
#[derive(Module, Debug)]
pub struct GruCell<B: Backend> {
    pub weight_ih: Param<Tensor<B, 2>>,
    pub weight_hh: Param<Tensor<B, 2>>,
    pub bias_ih: Param<Tensor<B, 1>>,
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> GruCell<B> {
    pub fn new(input: usize, hidden: usize, device: &B::Device) -> Self {
        // PyTorch: U(-1/sqrt(hidden), 1/sqrt(hidden)) for every parameter.
        Self {
            weight_ih: Param::from_tensor(torch_default_uniform([3 * hidden, input], hidden, device)),
            weight_hh: Param::from_tensor(torch_default_uniform([3 * hidden, hidden], hidden, device)),
            bias_ih: Param::from_tensor(torch_default_uniform([3 * hidden], hidden, device)),
            bias_hh: Param::from_tensor(torch_default_uniform([3 * hidden], hidden, device)),
        }
    }

    pub fn hidden(&self) -> usize {
        self.weight_hh.dims()[1]
    }

    /// One step: `x [N, in]`, `h [N, H]` → `h' [N, H]`.
    pub fn forward(&self, x: Tensor<B, 2>, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let hd = self.hidden();
        let n = x.dims()[0];
        let gi = x.matmul(self.weight_ih.val().transpose()) + self.bias_ih.val().unsqueeze::<2>();
        let gh = h.clone().matmul(self.weight_hh.val().transpose()) + self.bias_hh.val().unsqueeze::<2>();
        let part = |t: &Tensor<B, 2>, i: usize| t.clone().slice([0..n, i * hd..(i + 1) * hd]);
        let r = sigmoid(part(&gi, 0) + part(&gh, 0));
        let z = sigmoid(part(&gi, 1) + part(&gh, 1));
        let nn = tanh(part(&gi, 2) + r * part(&gh, 2));
        (z.clone().neg() + 1.0) * nn + z * h
    }
}

#[derive(Module, Debug)]
pub struct ChannelRouter<B: Backend> {
    /// One encoder per decision layer: Linear(C_in_t → hidden).
    pub encoders: Vec<Linear<B>>,
    pub gru: GruCell<B>,
    /// Linear(hidden → groups).
    pub head: Linear<B>,
    /// Linear(hidden → 1), the learned baseline.
    pub value: Option<Linear<B>>,
}

/// What the router computes at one step, for the learner.
pub struct StepOutput<B: Backend> {
    pub log_probs: Tensor<B, 2>,
    pub value: Option<Tensor<B, 1>>,
}

impl<B: Backend> ChannelRouter<B> {
    /// A router for a backbone whose decision layers take `in_channels[t]` input channels.
    pub fn new(cfg: &ControllerConfig, in_channels: &[usize], value_head: bool, device: &B::Device) -> Self {
        let d = cfg.hidden;
        Self {
            encoders: in_channels.iter().map(|&c| Linear::new(c, d, true, device)).collect(),
            gru: GruCell::new(d, d, device),
            head: Linear::new(d, cfg.groups, true, device),
            value: value_head.then(|| Linear::new(d, 1, true, device)),
        }
    }

    /// Input channels of each decision layer (decision t observes the input of conv t).
    /// `image_channels` is kept for callers; the convs know their inputs.
    pub fn input_channels(_image_channels: usize, convs: &[PrunableConv]) -> Vec<usize> {
        convs.iter().map(|c| c.in_channels).collect()
    }

    pub fn groups(&self) -> usize {
        self.head.out_features()
    }

    pub fn hidden(&self) -> usize {
        self.gru.hidden()
    }

    /// One recurrent step from observation `obs [N, C_t]` and state `h`.
    pub fn step(&self, t: usize, obs: Tensor<B, 2>, h: Tensor<B, 2>) -> Result<(Tensor<B, 2>, StepOutput<B>)> {
        let Some(enc) = self.encoders.get(t) else {
            bail!("router has {} encoders, asked for decision {t}", self.encoders.len())
        };
        if obs.dims()[1] != enc.in_features() {
            bail!("decision {t}: observation has {} channels, encoder expects {}", obs.dims()[1], enc.in_features());
        }
        let e = burn::tensor::activation::relu(enc.forward(obs));
        let h = self.gru.forward(e, h);
        let log_probs = log_softmax(self.head.forward(h.clone()), 1);
        let n = h.dims()[0];
        let value = self.value.as_ref().map(|v| v.forward(h.clone()).reshape([n]));
        Ok((h.clone(), StepOutput { log_probs, value }))
    }

    /// Re-evaluates the stored observation sequence: per decision, log-prob of the stored
    /// actions `[N]`, entropy `[N]` and value `[N]` (if the router has a value head).
    #[allow(clippy::type_complexity)]
    pub fn evaluate(
        &self,
        observations: &[Tensor<B, 2>],
        actions: &[Vec<usize>],
    ) -> Result<Vec<(Tensor<B, 1>, Tensor<B, 1>, Option<Tensor<B, 1>>)>> {
        let Some(first) = observations.first() else {
            return Ok(Vec::new());
        };
        let n = first.dims()[0];
        let device = first.device();
        let mut h = Tensor::zeros([n, self.hidden()], &device);
        let mut out = Vec::new();
        for (t, (obs, acts)) in observations.iter().zip(actions).enumerate() {
            let (h2, s) = self.step(t, obs.clone(), h)?;
            h = h2;
            let (lp, ent) = pick(s.log_probs, acts, &device);
            out.push((lp, ent, s.value));
        }
        Ok(out)
    }
}

/// Log-probs of `actions` (1-based) and the entropy, both `[N]`.
fn pick<B: Backend>(log_probs: Tensor<B, 2>, actions: &[usize], device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = actions.len();
    let idx: Vec<i64> = actions.iter().map(|&a| a as i64 - 1).collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, 1]), device);
    let lp = log_probs.clone().gather(1, idx).reshape([n]);
    let ent = (log_probs.clone().exp() * log_probs).sum_dim(1).reshape([n]).neg();
    (lp, ent)
}

/// The router as a [`Controller`]: the module plus the recurrent state of the current batch.
pub struct RouterPolicy<B: Backend> {
    pub router: ChannelRouter<B>,
    h: Option<Tensor<B, 2>>,
}

impl<B: Backend> RouterPolicy<B> {
    pub fn new(router: ChannelRouter<B>) -> Self {
        Self { router, h: None }
    }
}

/// Samples from a categorical distribution given by `probs` (host side).
pub fn sample_categorical(probs: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let u: f32 = rng.random::<f32>();
    let mut acc = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.len() - 1
}

impl<B: Backend> Controller<B> for RouterPolicy<B> {
    fn groups(&self) -> usize {
        self.router.groups()
    }

    fn reset(&mut self, _batch: usize) {
        self.h = None;
    }

    fn decide(
        &mut self,
        point: &DecisionPoint,
        observation: Tensor<B, 2>,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) -> Result<Decision<B>> {
        let [n, _] = observation.dims();
        let device = observation.device();
        let h = match self.h.take() {
            Some(h) => h,
            None => Tensor::zeros([n, self.router.hidden()], &device),
        };
        let (h, s) = self.router.step(point.index, observation, h)?;
        self.h = Some(h);
        let k = self.router.groups();
        let probs = softmax(s.log_probs.clone().detach(), 1).into_data().convert::<f32>();
        let probs = probs.as_slice::<f32>().map_err(|e| anyhow::anyhow!("router probabilities: {e:?}"))?;
        let actions: Vec<usize> = (0..n)
            .map(|i| {
                let row = &probs[i * k..(i + 1) * k];
                1 + match mode {
                    Mode::Sample => sample_categorical(row, rng),
                    Mode::Greedy => {
                        row.iter().enumerate().fold(0, |best, (j, &p)| if p > row[best] { j } else { best })
                    }
                }
            })
            .collect();
        let (log_prob, entropy) = pick(s.log_probs, &actions, &device);
        Ok(Decision { actions, log_prob, entropy })
    }
}
