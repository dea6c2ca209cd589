//! Deep Q-learning of the router, as RNP trained its agent: the router's head gives Q-values
//! over the k actions from the recurrent state (the state summarises the layers seen so far),
//! rollouts act ε-greedily with a linearly decaying ε, episodes (one image = the sequence of
//! its decision layers) go to a replay buffer, and minibatches of episodes are regressed onto
//! TD targets from a target network that is synced every `target_sync_every` updates:
//! `y_t = r_t + γ max_a Q_target(s_{t+1}, a)`, `y_T = r_T` at the last layer (Huber loss).
//!
//! Whole episodes are replayed because the state is recurrent: the learner unrolls both
//! networks over the stored observation sequence, as in the recurrent-replay variant of DQN.

use std::collections::VecDeque;

use anyhow::{Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::RlConfig;
use super::reinforce::UpdateStats;
use super::rollout::Trajectory;
use crate::controllers::SequencePolicy;
use crate::nn::params::{HostTensor, StateDict};
use crate::train::optim::Optimizer;

/// One image's episode: per decision its observation, action (1..=k) and reward.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub observations: Vec<Vec<f32>>,
    pub actions: Vec<usize>,
    pub rewards: Vec<f32>,
}

/// A FIFO buffer of the most recent `capacity` episodes.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    capacity: usize,
    episodes: VecDeque<Episode>,
    /// Observation width per decision.
    channels: Vec<usize>,
}

impl ReplayBuffer {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), episodes: VecDeque::new(), channels: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.episodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.episodes.is_empty()
    }

    /// Adds every image of `traj` as an episode, dropping the oldest beyond capacity.
    pub fn push(&mut self, traj: &Trajectory) -> Result<()> {
        let channels: Vec<usize> = traj.observations.iter().map(|(_, c)| *c).collect();
        if self.channels.is_empty() {
            self.channels = channels;
        } else if self.channels != channels {
            bail!("replay buffer: episode shapes changed ({:?} vs {:?})", channels, self.channels);
        }
        for i in 0..traj.n {
            self.episodes.push_back(Episode {
                observations: traj.observations.iter().map(|(d, c)| d[i * c..(i + 1) * c].to_vec()).collect(),
                actions: traj.actions.iter().map(|a| a[i]).collect(),
                rewards: traj.rewards.iter().map(|r| r[i]).collect(),
            });
            if self.episodes.len() > self.capacity {
                self.episodes.pop_front();
            }
        }
        Ok(())
    }

    /// `m` distinct episode indices, uniformly (all of them when `m >= len`).
    pub fn sample(&self, m: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let len = self.len();
        if m >= len {
            return (0..len).collect();
        }
        rand::seq::index::sample(rng, len, m).into_vec()
    }

    /// The buffer as tensors, oldest episode first: per decision `t` the observations
    /// `obs.{t}` `[len, C_t]`, and `actions`, `rewards` `[len, T]` (actions are small integers,
    /// exact in f32).
    pub fn to_state_dict(&self) -> StateDict {
        let len = self.len();
        let t_len = self.channels.len();
        let mut dict = StateDict::new();
        for (t, &c) in self.channels.iter().enumerate() {
            let data = self.episodes.iter().flat_map(|e| e.observations[t].iter().copied()).collect();
            dict.insert(format!("obs.{t}"), HostTensor::new(vec![len, c], data));
        }
        let actions = self.episodes.iter().flat_map(|e| e.actions.iter().map(|&a| a as f32)).collect();
        let rewards = self.episodes.iter().flat_map(|e| e.rewards.iter().copied()).collect();
        dict.insert("actions".into(), HostTensor::new(vec![len, t_len], actions));
        dict.insert("rewards".into(), HostTensor::new(vec![len, t_len], rewards));
        dict
    }

    /// The buffer [`ReplayBuffer::to_state_dict`] wrote, with room for `capacity` episodes.
    pub fn from_state_dict(capacity: usize, dict: &StateDict) -> Result<Self> {
        let shape = |k: &str| dict.get(k).map(|t| t.shape.clone()).ok_or_else(|| anyhow::anyhow!("replay buffer: no tensor '{k}'"));
        let [len, t_len] = shape("actions")?[..] else { bail!("replay buffer: actions must be [episodes, decisions]") };
        if shape("rewards")? != [len, t_len] {
            bail!("replay buffer: rewards must be [{len}, {t_len}] like the actions");
        }
        let mut channels = Vec::with_capacity(t_len);
        for t in 0..t_len {
            match shape(&format!("obs.{t}"))?[..] {
                [n, c] if n == len => channels.push(c),
                ref other => bail!("replay buffer: obs.{t} is {other:?}, expected [{len}, C]"),
            }
        }
        let episodes = (0..len)
            .map(|i| Episode {
                observations: channels.iter().enumerate().map(|(t, &c)| dict[&format!("obs.{t}")].data[i * c..(i + 1) * c].to_vec()).collect(),
                actions: dict["actions"].data[i * t_len..(i + 1) * t_len].iter().map(|&a| a as usize).collect(),
                rewards: dict["rewards"].data[i * t_len..(i + 1) * t_len].to_vec(),
            })
            .collect();
        let mut buffer = Self { capacity: capacity.max(1), episodes, channels };
        while buffer.episodes.len() > buffer.capacity {
            buffer.episodes.pop_front();
        }
        Ok(buffer)
    }

    /// Per decision the observations `[m, C_t]` of episodes `idx`.
    fn observations<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Vec<Tensor<B, 2>> {
        self.channels
            .iter()
            .enumerate()
            .map(|(t, &c)| {
                let mut v = Vec::with_capacity(idx.len() * c);
                for &i in idx {
                    v.extend_from_slice(&self.episodes[i].observations[t]);
                }
                Tensor::from_data(TensorData::new(v, [idx.len(), c]), device)
            })
            .collect()
    }
}

/// DQN's learner state: the replay buffer and the target network.
pub struct DqnState<B: AutodiffBackend, P: AutodiffModule<B>> {
    pub buffer: ReplayBuffer,
    pub target: P::InnerModule,
    /// Gradient updates done (drives the target sync).
    pub updates: u64,
}

impl<B: AutodiffBackend, P: SequencePolicy<B> + AutodiffModule<B>> DqnState<B, P>
where
    P::InnerModule: SequencePolicy<B::InnerBackend>,
{
    pub fn new(policy: &P, cfg: &RlConfig) -> Self {
        Self { buffer: ReplayBuffer::new(cfg.dqn.replay_capacity), target: policy.valid(), updates: 0 }
    }

    /// Stores `traj` and runs `updates_per_batch` TD updates on replayed minibatches.
    /// `epsilon` is the rate the rollout used (reported only); `seed` drives the sampling.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        mut policy: P,
        optim: &mut Optimizer<B>,
        traj: &Trajectory,
        cfg: &RlConfig,
        lr: f64,
        epsilon: f64,
        device: &B::Device,
        seed: u64,
    ) -> Result<(P, UpdateStats)> {
        self.buffer.push(traj)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let gamma = cfg.gamma as f32;
        let (mut td_sum, mut q_sum) = (0f64, 0f64);
        for _ in 0..cfg.dqn.updates_per_batch {
            let idx = self.buffer.sample(cfg.minibatch, &mut rng);
            let m = idx.len();
            let t_len = self.buffer.channels.len();
            // Targets from the target network (no graph).
            let next_max: Vec<Vec<f32>> = self
                .target
                .unroll(&self.buffer.observations::<B::InnerBackend>(&idx, device))?
                .into_iter()
                .map(|s| s.scores.max_dim(1).reshape([m]).into_data().convert::<f32>().to_vec())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("DQN target readback: {e:?}"))?;
            let online = policy.unroll(&self.buffer.observations::<B>(&idx, device))?;
            let mut loss = Tensor::<B, 1>::zeros([1], device);
            let mut q_taken_sum = Tensor::<B, 1>::zeros([1], device);
            for (t, step) in online.into_iter().enumerate() {
                let acts: Vec<i64> = idx.iter().map(|&i| self.buffer.episodes[i].actions[t] as i64 - 1).collect();
                let acts = Tensor::<B, 2, Int>::from_data(TensorData::new(acts, [m, 1]), device);
                let q = step.scores.gather(1, acts).reshape([m]);
                let y: Vec<f32> = idx
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| {
                        let r = self.buffer.episodes[i].rewards[t];
                        if t + 1 < t_len { r + gamma * next_max[t + 1][j] } else { r }
                    })
                    .collect();
                let y = Tensor::<B, 1>::from_data(TensorData::new(y, [m]), device);
                // Huber (δ = 1): ½d² inside, |d| − ½ outside.
                let abs = (q.clone() - y).abs();
                let inner = abs.clone().clamp_max(1.0);
                loss = loss + (inner.clone().powf_scalar(2.0) * 0.5 + (abs - inner)).mean();
                q_taken_sum = q_taken_sum + q.detach().mean();
            }
            let loss = loss / t_len as f64;
            td_sum += loss.clone().detach().into_scalar().elem::<f64>();
            q_sum += q_taken_sum.into_scalar().elem::<f64>() / t_len as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &policy);
            policy = optim.step(policy, grads, lr, 1.0);
            self.updates += 1;
            if self.updates.is_multiple_of(cfg.dqn.target_sync_every as u64) {
                self.target = policy.valid();
            }
        }
        let u = cfg.dqn.updates_per_batch.max(1) as f64;
        let mut stats = traj.stats();
        stats.td_loss = td_sum / u;
        stats.q_mean = q_sum / u;
        stats.epsilon = epsilon;
        Ok((policy, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_buffer_round_trips_through_tensors() {
        let mut b = ReplayBuffer::new(3);
        for i in 0..4 {
            b.episodes.push_back(Episode {
                observations: vec![vec![i as f32, 0.5], vec![1.0, 2.0, i as f32 * 0.25]],
                actions: vec![1 + i % 2, 4],
                rewards: vec![0.0, -0.1 * i as f32],
            });
        }
        b.episodes.pop_front();
        b.channels = vec![2, 3];
        let back = ReplayBuffer::from_state_dict(3, &b.to_state_dict()).unwrap();
        assert_eq!(back.episodes, b.episodes);
        assert_eq!(back.channels, b.channels);
        let smaller = ReplayBuffer::from_state_dict(2, &b.to_state_dict()).unwrap();
        assert_eq!(smaller.episodes, b.episodes.iter().skip(1).cloned().collect::<VecDeque<_>>(), "the oldest go first");
        let mut broken = b.to_state_dict();
        broken.remove("obs.1");
        assert!(ReplayBuffer::from_state_dict(3, &broken).is_err());
    }
}
