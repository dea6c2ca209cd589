//! Rollouts of a [`SequencePolicy`] on the parallel workers (actor–learner, `rl::workers`). Each
//! worker receives a policy snapshot (on the inner backend) and a read-only backbone
//! snapshot with its share of the batch, samples actions with its own RNG seeded from (seed,
//! step, worker id), computes the rewards, and sends the trajectory back. `workers = 1` runs the
//! same algorithm; the same seed and worker count give identical rollouts.

use anyhow::{Result, anyhow};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Baseline, Budget, BudgetPolicy, RlConfig};
use super::reinforce::UpdateStats;
use super::reward;
use super::workers::{WorkerPool, share, threads_per_worker};
use crate::ModelBackend;
use crate::backbones::{AnyBackbone, Backbone};
use crate::controllers::{ActionRule, Mode, SequencePolicy, Trace};

/// A batch of episodes: per decision the observations and actions, per image the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// Number of images.
    pub n: usize,
    /// Per decision: observations `[n * C_t]` row-major and `C_t`.
    pub observations: Vec<(Vec<f32>, usize)>,
    /// Per decision, per image: groups computed (1..=k).
    pub actions: Vec<Vec<usize>>,
    /// Per decision, per image.
    pub rewards: Vec<Vec<f32>>,
    /// Per image: the final accuracy term and whether top-1 was right.
    pub accuracy_term: Vec<f32>,
    pub correct: Vec<bool>,
    /// Per decision, per image: MACs spent.
    pub macs: Vec<Vec<u64>>,
    /// Per decision: MACs of the full layer.
    pub macs_full: Vec<u64>,
    /// Self-critical baseline: the greedy rollout's returns-to-go `[T][n]`.
    pub greedy_returns: Option<Vec<Vec<f32>>>,
    /// The greedy rollout's MACs spent and full MACs over all images, when it ran.
    pub greedy_macs: Option<(u64, u64)>,
    pub groups: usize,
}

impl Trajectory {
    /// Concatenates per-worker trajectories (in worker order) along the images.
    pub fn concat(parts: Vec<Trajectory>) -> Result<Trajectory> {
        let mut it = parts.into_iter();
        let mut acc = it.next().ok_or_else(|| anyhow!("no trajectories to merge"))?;
        for p in it {
            if p.actions.len() != acc.actions.len() {
                return Err(anyhow!("trajectories of different lengths"));
            }
            acc.n += p.n;
            for (a, b) in acc.observations.iter_mut().zip(p.observations) {
                a.0.extend(b.0);
            }
            for (a, b) in acc.actions.iter_mut().zip(p.actions) {
                a.extend(b);
            }
            for (a, b) in acc.rewards.iter_mut().zip(p.rewards) {
                a.extend(b);
            }
            for (a, b) in acc.macs.iter_mut().zip(p.macs) {
                a.extend(b);
            }
            acc.accuracy_term.extend(p.accuracy_term);
            acc.correct.extend(p.correct);
            acc.greedy_returns = match (acc.greedy_returns.take(), p.greedy_returns) {
                (Some(mut a), Some(b)) => {
                    for (x, y) in a.iter_mut().zip(b) {
                        x.extend(y);
                    }
                    Some(a)
                }
                _ => None,
            };
            acc.greedy_macs = match (acc.greedy_macs, p.greedy_macs) {
                (Some(a), Some(b)) => Some((a.0 + b.0, a.1 + b.1)),
                _ => None,
            };
        }
        Ok(acc)
    }

    /// Per decision, the observations of images `rows` (in that order) as `[rows.len(), C_t]`.
    pub fn observation_rows<B: burn::tensor::backend::Backend>(
        &self,
        rows: &[usize],
        device: &B::Device,
    ) -> Vec<Tensor<B, 2>> {
        self.observations
            .iter()
            .map(|(data, c)| {
                let mut v = Vec::with_capacity(rows.len() * c);
                for &i in rows {
                    v.extend_from_slice(&data[i * c..(i + 1) * c]);
                }
                Tensor::from_data(TensorData::new(v, [rows.len(), *c]), device)
            })
            .collect()
    }

    /// Per decision, the actions of images `rows`.
    pub fn action_rows(&self, rows: &[usize]) -> Vec<Vec<usize>> {
        self.actions.iter().map(|a| rows.iter().map(|&i| a[i]).collect()).collect()
    }

    /// Episode returns per image.
    pub fn episode_returns(&self) -> Vec<f32> {
        (0..self.n).map(|i| self.rewards.iter().map(|r| r[i]).sum()).collect()
    }

    /// The greedy policy's FLOPs ratio on this batch, when the greedy rollout ran.
    pub fn greedy_flops_ratio(&self) -> Option<f64> {
        self.greedy_macs.map(|(spent, full)| spent as f64 / full.max(1) as f64)
    }

    /// Reward, accuracy and FLOPs statistics (the learner adds entropy and losses).
    pub fn stats(&self) -> UpdateStats {
        let r = self.episode_returns();
        let n = r.len().max(1) as f64;
        let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let spent: u64 = self.macs.iter().flatten().sum();
        let full: u64 = self.macs_full.iter().sum::<u64>() * self.n as u64;
        UpdateStats {
            reward_mean: mean,
            reward_std: var.sqrt(),
            accuracy_term: self.accuracy_term.iter().map(|&x| x as f64).sum::<f64>() / n,
            top1: self.correct.iter().filter(|&&c| c).count() as f64 / n,
            flops_ratio: spent as f64 / full.max(1) as f64,
            ..Default::default()
        }
    }
}

/// Per-worker RNG seed: a pure function of (seed, step, worker).
pub fn worker_seed(seed: u64, step: u64, worker: usize) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (worker as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs episodes for `images [n, C, H, W]` (row-major) with `labels`. `price` is the compute
/// price of the reward: `cfg.compute_penalty`, or the learner's current λ with
/// `budget = "mean"`.
#[allow(clippy::too_many_arguments)]
pub fn rollout_shard<B: ModelBackend, P: SequencePolicy<B>>(
    backbone: &AnyBackbone<B>,
    policy: &P,
    images: Vec<f32>,
    shape: [usize; 4],
    labels: Vec<i64>,
    cfg: &RlConfig,
    price: f64,
    rule: ActionRule,
    rng_seed: u64,
) -> Result<Trajectory> {
    let device = crate::nn::params::device_of(backbone);
    let n = shape[0];
    let x = Tensor::<B, 4>::from_data(TensorData::new(images, shape), &device);
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels.clone(), [n]), &device);
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let k = policy.groups();
    // One actor for the sampled and the greedy episode: the forward pass resets its state.
    let mut actor = policy.actor(rule);
    #[allow(clippy::type_complexity)]
    let mut episode =
        |mode: Mode,
         rng: &mut ChaCha8Rng|
         -> Result<(Vec<Vec<usize>>, Vec<Vec<f32>>, Vec<f32>, Vec<bool>, Trace<B>)> {
            let (logits, trace) = backbone.forward_controlled(x.clone(), actor.as_mut(), mode, rng)?;
            let ce: Vec<f32> = log_softmax(logits.clone(), 1)
                .gather(1, y.clone().reshape([n, 1]))
                .reshape([n])
                .neg()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| anyhow!("{e:?}"))?;
            let pred: Vec<i64> =
                logits.argmax(1).reshape([n]).into_data().convert::<i64>().to_vec().map_err(|e| anyhow!("{e:?}"))?;
            let correct: Vec<bool> = pred.iter().zip(&labels).map(|(p, l)| p == l).collect();
            let acc: Vec<f32> = ce.iter().zip(&correct).map(|(&c, &ok)| reward::accuracy_term(cfg, c, ok)).collect();
            let actions: Vec<Vec<usize>> = trace.steps.iter().map(|s| s.actions.clone()).collect();
            let macs: Vec<Vec<u64>> = trace.steps.iter().map(|s| s.macs.clone()).collect();
            let full: Vec<u64> = trace.steps.iter().map(|s| s.point.macs_full).collect();
            let rewards = match cfg.flops_target {
                Some(target) if cfg.budget == Budget::Mean => reward::priced_rewards(&macs, &full, price, target, &acc),
                Some(target) => reward::budget_rewards(&macs, &full, price, target, &acc),
                None => reward::rewards(&actions, k, price, &acc),
            };
            Ok((actions, rewards, acc, correct, trace))
        };
    let (actions, rewards, accuracy_term, correct, trace) = episode(Mode::Sample, &mut rng)?;
    let self_critical = cfg.baseline == Baseline::SelfCritical;
    let greedy_budget = cfg.flops_target.is_some() && cfg.budget == Budget::Mean && cfg.budget_policy == BudgetPolicy::Greedy;
    let (greedy_returns, greedy_macs) = if self_critical || greedy_budget {
        let (_, r, _, _, greedy) = episode(Mode::Greedy, &mut rng)?;
        let spent: u64 = greedy.steps.iter().flat_map(|s| s.macs.iter()).sum();
        let full: u64 = greedy.steps.iter().map(|s| s.point.macs_full).sum::<u64>() * n as u64;
        (self_critical.then(|| reward::returns_to_go(&r)), Some((spent, full)))
    } else {
        (None, None)
    };
    let mut observations = Vec::with_capacity(trace.steps.len());
    for s in &trace.steps {
        let c = s.observation.dims()[1];
        let v: Vec<f32> = s.observation.clone().into_data().convert::<f32>().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        observations.push((v, c));
    }
    Ok(Trajectory {
        n,
        observations,
        actions,
        rewards,
        accuracy_term,
        correct,
        macs: trace.steps.iter().map(|s| s.macs.clone()).collect(),
        macs_full: trace.steps.iter().map(|s| s.point.macs_full).collect(),
        greedy_returns,
        greedy_macs,
        groups: k,
    })
}

struct Job<B: ModelBackend, P> {
    backbone: AnyBackbone<B>,
    policy: P,
    images: Vec<f32>,
    shape: [usize; 4],
    labels: Vec<i64>,
    cfg: RlConfig,
    price: f64,
    rule: ActionRule,
    seed: u64,
}

/// The rollout threads of a policy `P` over backbones on `B`.
pub struct RolloutPool<B: ModelBackend, P: SequencePolicy<B>> {
    pool: WorkerPool<Job<B, P>, Trajectory>,
}

impl<B: ModelBackend, P: SequencePolicy<B>> RolloutPool<B, P> {
    /// `workers` threads, each with [`threads_per_worker`] convolution threads.
    pub fn new(workers: usize) -> Self {
        Self::with_compute_threads(workers, threads_per_worker(workers))
    }

    /// `workers` threads whose kernels each use `compute_threads` threads.
    pub fn with_compute_threads(workers: usize, compute_threads: usize) -> Self {
        let pool = WorkerPool::with_compute_threads(workers, compute_threads, |job: Job<B, P>| {
            rollout_shard(&job.backbone, &job.policy, job.images, job.shape, job.labels, &job.cfg, job.price, job.rule, job.seed)
        });
        Self { pool }
    }

    pub fn workers(&self) -> usize {
        self.pool.workers()
    }

    /// Splits the batch into contiguous shares, one per worker, runs them with the given
    /// snapshots and compute price, and merges the trajectories in worker order.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        backbone: &AnyBackbone<B>,
        policy: &P,
        images: &[f32],
        shape: [usize; 4],
        labels: &[i64],
        cfg: &RlConfig,
        price: f64,
        rule: ActionRule,
        seed: u64,
        step: u64,
    ) -> Result<Trajectory> {
        let n = shape[0];
        let per = shape[1] * shape[2] * shape[3];
        let w = self.workers().min(n.max(1));
        let jobs = (0..w)
            .map(|wid| {
                let (a, b) = share(n, w, wid);
                Job {
                    backbone: backbone.clone(),
                    policy: policy.clone(),
                    images: images[a * per..b * per].to_vec(),
                    shape: [b - a, shape[1], shape[2], shape[3]],
                    labels: labels[a..b].to_vec(),
                    cfg: cfg.clone(),
                    price,
                    rule,
                    seed: worker_seed(seed, step, wid),
                }
            })
            .collect();
        Trajectory::concat(self.pool.run(jobs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(n: usize, greedy: Option<(u64, u64)>) -> Trajectory {
        Trajectory {
            n,
            observations: vec![(vec![0.0; n], 1)],
            actions: vec![vec![1; n]],
            rewards: vec![vec![0.0; n]],
            accuracy_term: vec![0.0; n],
            correct: vec![true; n],
            macs: vec![vec![10; n]],
            macs_full: vec![40],
            greedy_returns: None,
            greedy_macs: greedy,
            groups: 4,
        }
    }

    #[test]
    fn the_greedy_flops_ratio_pools_every_workers_images() {
        let t = Trajectory::concat(vec![part(2, Some((20, 80))), part(6, Some((180, 240)))]).unwrap();
        assert_eq!(t.greedy_macs, Some((200, 320)));
        assert!((t.greedy_flops_ratio().unwrap() - 0.625).abs() < 1e-12);
        assert!((t.stats().flops_ratio - 0.25).abs() < 1e-12);
        let missing = Trajectory::concat(vec![part(2, Some((20, 80))), part(2, None)]).unwrap();
        assert_eq!(missing.greedy_flops_ratio(), None);
    }
}
