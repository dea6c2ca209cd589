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
use burn::tensor::{Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::policy::{ActionRule, SequencePolicy, StepOutput, pick};
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

impl<B: LinearBackend> ChannelRouter<B> {
    /// A router for a backbone whose decision layers take `in_channels[t]` input channels.
    pub fn new(cfg: &ControllerConfig, in_channels: &[usize], value_head: bool, device: &B::Device) -> Self {
        let d = cfg.hidden;
        let lstm = cfg.rnn == super::RnnCell::Lstm;
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
}

/// The router as a [`Controller`]: the module plus the recurrent state of the current batch.
/// [`Mode::Greedy`] takes the argmax of the head under every rule.
pub struct RouterPolicy<B: Backend> {
    router: ChannelRouter<B>,
    pub rule: ActionRule,
    state: Option<RnnState<B>>,
    /// Off autodiff, the router's weights on the host and the batch's recurrent state there:
    /// a decision is then a few small GEMMs on the host instead of some fifty tensor ops, each
    /// with its own dispatch and allocation (four layers of them cost a third of a batch-1
    /// small-CNN forward).
    host: Option<(HostRouter, HostState)>,
}

impl<B: LinearBackend> RouterPolicy<B> {
    pub fn new(router: ChannelRouter<B>) -> Self {
        Self::with_rule(router, ActionRule::Softmax)
    }

    pub fn with_rule(router: ChannelRouter<B>, rule: ActionRule) -> Self {
        let device = router.head.weight.device();
        let host = (!B::ad_enabled(&device)).then(|| HostRouter::of(&router)).flatten().map(|r| (r, HostState::default()));
        Self { router, rule, state: None, host }
    }
}

impl<B: LinearBackend> SequencePolicy<B> for ChannelRouter<B> {
    fn groups(&self) -> usize {
        ChannelRouter::groups(self)
    }

    fn has_value_head(&self) -> bool {
        self.value.is_some()
    }

    fn unroll(&self, observations: &[Tensor<B, 2>]) -> Result<Vec<StepOutput<B>>> {
        ChannelRouter::unroll(self, observations)
    }

    fn actor(&self, rule: ActionRule) -> Box<dyn Controller<B>> {
        Box::new(RouterPolicy::with_rule(self.clone(), rule))
    }
}

/// A Linear's weight, transposed to `[in, out]`, and its bias, read back once.
struct HostLinear {
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl HostLinear {
    fn of<B: Backend>(weight: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>) -> Option<Self> {
        let [outputs, inputs] = weight.dims();
        let weight_t = weight.clone().transpose().into_data().convert::<f32>().to_vec().ok()?;
        let bias = match bias {
            Some(b) => b.clone().into_data().convert::<f32>().to_vec().ok()?,
            None => vec![0.0; outputs],
        };
        Some(Self { weight_t, bias, inputs, outputs })
    }

    fn of_layer<B: Backend>(l: &Linear<B>) -> Option<Self> {
        Self::of(&l.weight.val(), l.bias.as_ref().map(|b| b.val()).as_ref())
    }

    /// One row: `y += x·Wᵀ`, by blocks of outputs held in registers over all the inputs, so
    /// that the weight is the only stream (a loop over the inputs that adds each scaled weight
    /// row into `y` loaded and stored `y` once per input, and bounded the router's step).
    fn row_into(&self, x: &[f32], y: &mut [f32]) {
        const BLOCK: usize = 32;
        let mut o = 0;
        while o + BLOCK <= self.outputs {
            let mut acc = [0f32; BLOCK];
            acc.copy_from_slice(&y[o..o + BLOCK]);
            for (&v, w) in x.iter().zip(self.weight_t.chunks_exact(self.outputs)) {
                let w: &[f32; BLOCK] = w[o..o + BLOCK].try_into().unwrap_or_else(|_| unreachable!());
                for (a, &wv) in acc.iter_mut().zip(w) {
                    *a = v.mul_add(wv, *a);
                }
            }
            y[o..o + BLOCK].copy_from_slice(&acc);
            o += BLOCK;
        }
        if o < self.outputs {
            for (&v, w) in x.iter().zip(self.weight_t.chunks_exact(self.outputs)) {
                for (a, &wv) in y[o..].iter_mut().zip(&w[o..]) {
                    *a = v.mul_add(wv, *a);
                }
            }
        }
    }

    /// `x [n, inputs]` → `x·Wᵀ + b`, `[n, outputs]`.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y: Vec<f32> = (0..n).flat_map(|_| self.bias.iter().copied()).collect();
        if n <= 4 {
            for (xi, yi) in x.chunks_exact(self.inputs.max(1)).zip(y.chunks_exact_mut(self.outputs)) {
                self.row_into(xi, yi);
            }
            return y;
        }
        crate::nn::conv::gemm_strided(
            n, self.inputs, self.outputs, x, (self.inputs, 1), &self.weight_t, (self.outputs, 1), true, &mut y, (self.outputs, 1),
        );
        y
    }
}

fn host_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::nn::activation_op::fast::exp(-x))
}

fn host_tanh(x: f32) -> f32 {
    1.0 - 2.0 / (crate::nn::activation_op::fast::exp(2.0 * x) + 1.0)
}

/// The recurrent cell on the host: PyTorch's GRU (gates r, z, n) or LSTM (i, f, g, o).
struct HostCell {
    input: HostLinear,
    hidden: HostLinear,
    lstm: bool,
}

/// [`ChannelRouter`]'s policy path (encoders, cell, policy head) on host floats.
struct HostRouter {
    encoders: Vec<HostLinear>,
    cell: HostCell,
    head: HostLinear,
}

/// The host recurrent state of the current batch (`c` for an LSTM only).
#[derive(Default)]
struct HostState {
    h: Vec<f32>,
    c: Vec<f32>,
}

impl HostRouter {
    fn of<B: Backend>(r: &ChannelRouter<B>) -> Option<Self> {
        let cell = match (&r.gru, &r.lstm) {
            (Some(g), _) => (&g.weight_ih, &g.weight_hh, &g.bias_ih, &g.bias_hh, false),
            (None, Some(l)) => (&l.weight_ih, &l.weight_hh, &l.bias_ih, &l.bias_hh, true),
            (None, None) => return None,
        };
        Some(Self {
            encoders: r.encoders.iter().map(HostLinear::of_layer).collect::<Option<_>>()?,
            cell: HostCell {
                input: HostLinear::of(&cell.0.val(), Some(&cell.2.val()))?,
                hidden: HostLinear::of(&cell.1.val(), Some(&cell.3.val()))?,
                lstm: cell.4,
            },
            head: HostLinear::of_layer(&r.head)?,
        })
    }

    /// Encoder `t`, cell and head on `obs [n, C_t]`: the head's log-softmax, `[n, k]`.
    fn step(&self, t: usize, obs: &[f32], n: usize, state: &mut HostState) -> Result<Vec<f32>> {
        let Some(enc) = self.encoders.get(t) else {
            bail!("router has {} encoders, asked for decision {t}", self.encoders.len())
        };
        if obs.len() != n * enc.inputs {
            bail!("decision {t}: observation has {} channels, encoder expects {}", obs.len() / n.max(1), enc.inputs);
        }
        let mut e = enc.forward(obs, n);
        e.iter_mut().for_each(|v| *v = v.max(0.0));
        let hd = self.cell.hidden.inputs;
        if state.h.len() != n * hd {
            state.h = vec![0.0; n * hd];
            state.c = vec![0.0; n * hd];
        }
        let mut gi = self.cell.input.forward(&e, n);
        let gh = self.cell.hidden.forward(&state.h, n);
        let width = self.cell.input.outputs;
        // Whole gate segments at a time, in loops that compile to SIMD.
        let sigmoid = |v: &mut [f32]| v.iter_mut().for_each(|x| *x = host_sigmoid(*x));
        let tanh = |v: &mut [f32]| v.iter_mut().for_each(|x| *x = host_tanh(*x));
        for i in 0..n {
            let (gi, gh) = (&mut gi[i * width..(i + 1) * width], &gh[i * width..(i + 1) * width]);
            let h = &mut state.h[i * hd..(i + 1) * hd];
            let c = &mut state.c[i * hd..(i + 1) * hd];
            if self.cell.lstm {
                gi.iter_mut().zip(gh).for_each(|(a, &b)| *a += b);
                let (ifg, rest) = gi.split_at_mut(2 * hd);
                let (gg, og) = rest.split_at_mut(hd);
                sigmoid(ifg);
                tanh(gg);
                sigmoid(og);
                let (ig, fg) = ifg.split_at(hd);
                for ((((cj, &i), &f), &g), (hj, &o)) in c.iter_mut().zip(ig).zip(fg.iter()).zip(gg.iter()).zip(h.iter_mut().zip(og.iter())) {
                    *cj = f * *cj + i * g;
                    *hj = o * host_tanh(*cj);
                }
            } else {
                let (rz, cand) = gi.split_at_mut(2 * hd);
                rz.iter_mut().zip(&gh[..2 * hd]).for_each(|(a, &b)| *a += b);
                sigmoid(rz);
                let (r, z) = rz.split_at(hd);
                cand.iter_mut().zip(r).zip(&gh[2 * hd..]).for_each(|((a, &r), &b)| *a += r * b);
                tanh(cand);
                for ((hj, &z), &cand) in h.iter_mut().zip(z).zip(cand.iter()) {
                    *hj = (1.0 - z) * cand + z * *hj;
                }
            }
        }
        let mut out = self.head.forward(&state.h, n);
        let k = self.head.outputs;
        for row in out.chunks_exact_mut(k) {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
            row.iter_mut().for_each(|v| *v -= lse);
        }
        Ok(out)
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
        if let Some((_, state)) = &mut self.host {
            *state = HostState::default();
        }
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
        let k = self.router.groups();
        // Per image, the log-probabilities of the k actions, on the host; and the tensor they
        // came from when autodiff needs it for the decision's log-probability.
        let (host_log_probs, graph) = match &mut self.host {
            Some((router, state)) => {
                let obs = observation.into_data().convert::<f32>();
                let obs = obs.as_slice::<f32>().map_err(|e| anyhow::anyhow!("router observation: {e:?}"))?;
                (router.step(point.index, obs, n, state)?, None)
            }
            None => {
                let state = match self.state.take() {
                    Some(s) => s,
                    None => self.router.initial_state(n, &device),
                };
                // The value head is the learner's business; acting needs the policy head only.
                let state = self.router.advance(point.index, observation, state)?;
                let log_probs = log_softmax(self.router.head.forward(state.h.clone()), 1);
                self.state = Some(state);
                let host = log_probs.clone().detach().into_data().convert::<f32>();
                let host = host.to_vec::<f32>().map_err(|e| anyhow::anyhow!("router probabilities: {e:?}"))?;
                (host, Some(log_probs))
            }
        };
        let probs: Vec<f32> = host_log_probs.iter().map(|v| v.exp()).collect();
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
        let (log_prob, entropy) = match graph {
            Some(log_probs) => pick(log_probs, &actions, &device),
            None => {
                let picked: Vec<f32> = actions.iter().enumerate().map(|(i, &a)| host_log_probs[i * k + a - 1]).collect();
                let entropy: Vec<f32> = (0..n)
                    .map(|i| -(0..k).map(|j| probs[i * k + j] * host_log_probs[i * k + j]).sum::<f32>())
                    .collect();
                (Tensor::from_data(TensorData::new(picked, [n]), &device), Tensor::from_data(TensorData::new(entropy, [n]), &device))
            }
        };
        Ok(Decision { actions, log_prob, entropy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use burn::tensor::Distribution;

    /// The host path (what inference runs) against the tensor path (what the learner
    /// differentiates), step by step, for both cells, a few images (dot products) and a batch
    /// (GEMMs).
    #[test]
    fn host_router_matches_the_tensor_router() {
        let device = Default::default();
        for rnn in [crate::controllers::RnnCell::Gru, crate::controllers::RnnCell::Lstm] {
            let cfg = ControllerConfig { kind: "channel-router".into(), groups: 4, hidden: 24, rnn, options: Default::default() };
            let in_ch = [3, 40, 17];
            let router = ChannelRouter::<Cpu>::new(&cfg, &in_ch, true, &device);
            let host = HostRouter::of(&router).unwrap();
            for n in [1, 3, 9] {
                let mut state = router.initial_state(n, &device);
                let mut host_state = HostState::default();
                for (t, &c) in in_ch.iter().enumerate() {
                    let obs = Tensor::<Cpu, 2>::random([n, c], Distribution::Normal(0.0, 2.0), &device);
                    let (next, out) = router.step(t, obs.clone(), state).unwrap();
                    state = next;
                    let want: Vec<f32> = out.log_probs.into_data().to_vec().unwrap();
                    let host_obs: Vec<f32> = obs.into_data().to_vec().unwrap();
                    let got = host.step(t, &host_obs, n, &mut host_state).unwrap();
                    assert_eq!(got.len(), want.len());
                    let gap = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(gap < 1e-5, "{rnn}, n = {n}, step {t}: log-probabilities differ by {gap}");
                }
            }
            // An observation of the wrong width is an error, not a panic.
            assert!(host.step(1, &[0.0; 3], 1, &mut HostState::default()).is_err());
        }
    }
}
