//! RNP's channel router (Lin et al., NeurIPS 2017): per decision layer an encoder
//! `encoders.{t}` (Linear C_in_t → d) of the layer's pooled input, a recurrent cell shared over
//! layers carrying state from layer to layer (`gru`, or `lstm` with `[controller] rnn =
//! "lstm"`), and a head (Linear d → k) over "compute the first a of k channel groups": policy
//! logits for REINFORCE / PPO, Q-values for DQN. An optional value head (Linear d → 1) provides
//! the learned baseline (REINFORCE) or critic (PPO).

use crate::nn::linear_op::LinearBackend;
use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, sigmoid, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Controller, ControllerConfig, Decision, DecisionPoint, Mode};
use crate::backbones::PrunableConv;
use crate::nn::Linear;
use crate::nn::layers::torch_default_uniform;

/// σ(x) for the recurrent gates. At inference it is `1 / (1 + e^{-x})`, one `exp` per element
/// where burn's numerically guarded form costs three transcendental calls: those calls were
/// 40 % of the router's time, and the router about 6 % of a routed batch-64 forward (`perf`).
/// Under autodiff burn's `sigmoid` stays, since this form's gradient overflows for |x| > 88.
fn gate_sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if B::ad_enabled(&x.device()) { sigmoid(x) } else { x.neg().exp().add_scalar(1.0).recip() }
}

/// tanh(x) for the recurrent cells: `1 − 2 / (e^{2x} + 1)` at inference (one f32 `exp` where
/// the backend evaluates tanh in f64), burn's `tanh` under autodiff (see [`gate_sigmoid`]).
fn gate_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if B::ad_enabled(&x.device()) {
        tanh(x)
    } else {
        x.mul_scalar(2.0).exp().add_scalar(1.0).recip().mul_scalar(-2.0).add_scalar(1.0)
    }
}

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
        // r and z in one sigmoid: at inference the router's cost is its op count, not its FLOPs.
        let rz = gate_sigmoid(gi.clone().slice([0..n, 0..2 * hd]) + gh.clone().slice([0..n, 0..2 * hd]));
        let (r, z) = (part(&rz, 0), part(&rz, 1));
        let nn = gate_tanh(part(&gi, 2) + r * part(&gh, 2));
        (z.clone().neg() + 1.0) * nn + z * h
    }
}

/// An LSTM cell with PyTorch's parameter names and gate order (i, f, g, o).
#[derive(Module, Debug)]
pub struct LstmCell<B: Backend> {
    pub weight_ih: Param<Tensor<B, 2>>,
    pub weight_hh: Param<Tensor<B, 2>>,
    pub bias_ih: Param<Tensor<B, 1>>,
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmCell<B> {
    pub fn new(input: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            weight_ih: Param::from_tensor(torch_default_uniform([4 * hidden, input], hidden, device)),
            weight_hh: Param::from_tensor(torch_default_uniform([4 * hidden, hidden], hidden, device)),
            bias_ih: Param::from_tensor(torch_default_uniform([4 * hidden], hidden, device)),
            bias_hh: Param::from_tensor(torch_default_uniform([4 * hidden], hidden, device)),
        }
    }

    pub fn hidden(&self) -> usize {
        self.weight_hh.dims()[1]
    }

    /// One step: `x [N, in]`, `(h, c) [N, H]` → `(h', c')`.
    pub fn forward(&self, x: Tensor<B, 2>, h: Tensor<B, 2>, c: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden();
        let n = x.dims()[0];
        let gates = x.matmul(self.weight_ih.val().transpose())
            + self.bias_ih.val().unsqueeze::<2>()
            + h.matmul(self.weight_hh.val().transpose())
            + self.bias_hh.val().unsqueeze::<2>();
        let part = |i: usize| gates.clone().slice([0..n, i * hd..(i + 1) * hd]);
        let (i, f, g, o) = (gate_sigmoid(part(0)), gate_sigmoid(part(1)), gate_tanh(part(2)), gate_sigmoid(part(3)));
        let c = f * c + i * g;
        let h = o * gate_tanh(c.clone());
        (h, c)
    }
}

/// The router's recurrent state for a batch: `h`, plus the cell state `c` for an LSTM.
#[derive(Debug, Clone)]
pub struct RnnState<B: Backend> {
    pub h: Tensor<B, 2>,
    pub c: Option<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct ChannelRouter<B: Backend> {
    /// One encoder per decision layer: Linear(C_in_t → hidden).
    pub encoders: Vec<Linear<B>>,
    /// Exactly one of `gru` / `lstm` is present.
    pub gru: Option<GruCell<B>>,
    pub lstm: Option<LstmCell<B>>,
    /// Linear(hidden → groups).
    pub head: Linear<B>,
    /// Linear(hidden → 1), the learned baseline.
    pub value: Option<Linear<B>>,
}

/// What the router computes at one step, for the learner.
pub struct StepOutput<B: Backend> {
    /// The head's raw output `[N, k]`: policy logits, or Q-values under DQN.
    pub scores: Tensor<B, 2>,
    pub log_probs: Tensor<B, 2>,
    pub value: Option<Tensor<B, 1>>,
}

impl<B: LinearBackend> ChannelRouter<B> {
    /// A router for a backbone whose decision layers take `in_channels[t]` input channels.
    pub fn new(cfg: &ControllerConfig, in_channels: &[usize], value_head: bool, device: &B::Device) -> Self {
        let d = cfg.hidden;
        let lstm = cfg.rnn == "lstm";
        Self {
            encoders: in_channels.iter().map(|&c| Linear::new(c, d, true, device)).collect(),
            gru: (!lstm).then(|| GruCell::new(d, d, device)),
            lstm: lstm.then(|| LstmCell::new(d, d, device)),
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
        match (&self.gru, &self.lstm) {
            (Some(g), _) => g.hidden(),
            (None, Some(l)) => l.hidden(),
            (None, None) => self.head.in_features(),
        }
    }

    /// The zero state for a batch of `n`.
    pub fn initial_state(&self, n: usize, device: &B::Device) -> RnnState<B> {
        let z = || Tensor::zeros([n, self.hidden()], device);
        RnnState { h: z(), c: self.lstm.is_some().then(z) }
    }

    /// One recurrent step from observation `obs [N, C_t]` and `state`.
    pub fn step(&self, t: usize, obs: Tensor<B, 2>, state: RnnState<B>) -> Result<(RnnState<B>, StepOutput<B>)> {
        let state = self.advance(t, obs, state)?;
        let h = state.h.clone();
        let scores = self.head.forward(h.clone());
        let log_probs = log_softmax(scores.clone(), 1);
        let n = h.dims()[0];
        let value = self.value.as_ref().map(|v| v.forward(h).reshape([n]));
        Ok((state, StepOutput { scores, log_probs, value }))
    }

    /// The recurrent part of [`step`](Self::step): encoder and cell, no heads.
    fn advance(&self, t: usize, obs: Tensor<B, 2>, state: RnnState<B>) -> Result<RnnState<B>> {
        let Some(enc) = self.encoders.get(t) else {
            bail!("router has {} encoders, asked for decision {t}", self.encoders.len())
        };
        if obs.dims()[1] != enc.in_features() {
            bail!("decision {t}: observation has {} channels, encoder expects {}", obs.dims()[1], enc.in_features());
        }
        let e = burn::tensor::activation::relu(enc.forward(obs));
        let state = match (&self.gru, &self.lstm, state.c) {
            (Some(g), _, _) => RnnState { h: g.forward(e, state.h), c: None },
            (None, Some(l), Some(c)) => {
                let (h, c) = l.forward(e, state.h, c);
                RnnState { h, c: Some(c) }
            }
            (None, Some(_), None) => bail!("LSTM router stepped without a cell state"),
            (None, None, _) => bail!("router has no recurrent cell"),
        };
        Ok(state)
    }

    /// Runs the router over a stored observation sequence and returns every step's output.
    pub fn unroll(&self, observations: &[Tensor<B, 2>]) -> Result<Vec<StepOutput<B>>> {
        let Some(first) = observations.first() else {
            return Ok(Vec::new());
        };
        let mut state = self.initial_state(first.dims()[0], &first.device());
        let mut out = Vec::with_capacity(observations.len());
        for (t, obs) in observations.iter().enumerate() {
            let (s2, o) = self.step(t, obs.clone(), state)?;
            state = s2;
            out.push(o);
        }
        Ok(out)
    }

    /// Re-evaluates the stored observation sequence: per decision, log-prob of the stored
    /// actions `[N]`, entropy `[N]` and value `[N]` (if the router has a value head).
    #[allow(clippy::type_complexity)]
    pub fn evaluate(
        &self,
        observations: &[Tensor<B, 2>],
        actions: &[Vec<usize>],
    ) -> Result<Vec<(Tensor<B, 1>, Tensor<B, 1>, Option<Tensor<B, 1>>)>> {
        if actions.len() != observations.len() {
            bail!("{} observation steps for {} action steps", observations.len(), actions.len());
        }
        let steps = self.unroll(observations)?;
        Ok(steps
            .into_iter()
            .zip(actions)
            .map(|(s, acts)| {
                let (lp, ent) = pick(s.log_probs, acts, &s.scores.device());
                (lp, ent, s.value)
            })
            .collect())
    }
}

/// Log-probs of `actions` (1-based) and the entropy, both `[N]`.
pub fn pick<B: Backend>(log_probs: Tensor<B, 2>, actions: &[usize], device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = actions.len();
    let idx: Vec<i64> = actions.iter().map(|&a| a as i64 - 1).collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, 1]), device);
    let lp = log_probs.clone().gather(1, idx).reshape([n]);
    let ent = (log_probs.clone().exp() * log_probs).sum_dim(1).reshape([n]).neg();
    (lp, ent)
}

/// How [`Mode::Sample`] picks actions from the head's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActionRule {
    /// Sample from softmax(head) (policy-gradient algorithms).
    Softmax,
    /// A uniformly random action with probability ε, else argmax of the head (DQN).
    EpsilonGreedy(f64),
}

/// The router as a [`Controller`]: the module plus the recurrent state of the current batch.
/// [`Mode::Greedy`] takes the argmax of the head under every rule.
pub struct RouterPolicy<B: Backend> {
    pub router: ChannelRouter<B>,
    pub rule: ActionRule,
    state: Option<RnnState<B>>,
}

impl<B: LinearBackend> RouterPolicy<B> {
    pub fn new(router: ChannelRouter<B>) -> Self {
        Self::with_rule(router, ActionRule::Softmax)
    }

    pub fn with_rule(router: ChannelRouter<B>, rule: ActionRule) -> Self {
        Self { router, rule, state: None }
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

impl<B: LinearBackend> Controller<B> for RouterPolicy<B> {
    fn groups(&self) -> usize {
        self.router.groups()
    }

    fn reset(&mut self, _batch: usize) {
        self.state = None;
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
        let state = match self.state.take() {
            Some(s) => s,
            None => self.router.initial_state(n, &device),
        };
        // The value head is the learner's business; acting needs the policy head only.
        let state = self.router.advance(point.index, observation, state)?;
        let log_probs = log_softmax(self.router.head.forward(state.h.clone()), 1);
        self.state = Some(state);
        let k = self.router.groups();
        let probs = log_probs.clone().detach().exp().into_data().convert::<f32>();
        let probs = probs.as_slice::<f32>().map_err(|e| anyhow::anyhow!("router probabilities: {e:?}"))?;
        let actions: Vec<usize> = (0..n)
            .map(|i| {
                let row = &probs[i * k..(i + 1) * k];
                let argmax = || row.iter().enumerate().fold(0, |best, (j, &p)| if p > row[best] { j } else { best });
                1 + match (mode, self.rule) {
                    (Mode::Sample, ActionRule::Softmax) => sample_categorical(row, rng),
                    (Mode::Sample, ActionRule::EpsilonGreedy(eps)) => {
                        // Always two draws per image, so the stream does not depend on outcomes.
                        let explore = rng.random::<f64>() < eps;
                        let random = rng.random_range(0..k);
                        if explore { random } else { argmax() }
                    }
                    (Mode::Greedy, _) => argmax(),
                }
            })
            .collect();
        let (log_prob, entropy) = pick(log_probs, &actions, &device);
        Ok(Decision { actions, log_prob, entropy })
    }
}
