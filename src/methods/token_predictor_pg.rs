//! The policy-gradient variant of DynamicViT's token predictor, on the framework's rollout
//! workers (`rl::workers`), actor–learner style as the channel router's:
//! - each worker gets a snapshot of the student (inner backend) and its share of the batch,
//!   keeps every live token with the predictor's keep probability (Bernoulli, seeded from
//!   (seed, step, worker)), and sends back per stage the decisions, the tokens alive before it,
//!   the predictor's input tokens, and per image the cross-entropy;
//! - the learner re-evaluates the predictors on those recorded inputs (so its REINFORCE gradient
//!   reaches the predictors only, as the router's reaches the router only) and turns the
//!   rewards `−λ·|keep_i − ρ_i|` per stage and `−CE` at the last into returns.
//!
//! `workers = 1` runs the same algorithm; the same seed and worker count give the same
//! trajectories.

use crate::controllers::StepEvaluation;
use anyhow::{Result, anyhow, ensure};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backbones::dynamicvit::{DynamicVit, TrainOutput};
use crate::rl::RlConfig;
use crate::rl::ppo::{clipped_surrogate, normalize};
use crate::rl::rollout::worker_seed;
use crate::train::optim::Optimizer;
use crate::rl::workers::{WorkerPool, share};
use crate::{Cpu, CpuAutodiff};

type Ad = CpuAutodiff;

/// One stage of an episode, on the host (`[N·P]` row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct StageRecord {
    /// 1 = keep.
    pub keep: Vec<f32>,
    /// The tokens still alive before the stage.
    pub alive: Vec<f32>,
    /// The predictor's input `[N·P·C]` (recorded by the rollout workers only).
    pub tokens: Vec<f32>,
}

/// A batch of episodes of the token predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTrajectory {
    pub n: usize,
    pub patches: usize,
    pub dim: usize,
    pub stages: Vec<StageRecord>,
    /// Per image.
    pub cross_entropy: Vec<f32>,
}

impl TokenTrajectory {
    /// Concatenates per-worker trajectories (in worker order) along the images.
    pub fn concat(parts: Vec<TokenTrajectory>) -> Result<TokenTrajectory> {
        let mut it = parts.into_iter();
        let mut acc = it.next().ok_or_else(|| anyhow!("no trajectories to merge"))?;
        for p in it {
            ensure!(p.stages.len() == acc.stages.len(), "trajectories of different lengths");
            acc.n += p.n;
            for (a, b) in acc.stages.iter_mut().zip(p.stages) {
                a.keep.extend(b.keep);
                a.alive.extend(b.alive);
                a.tokens.extend(b.tokens);
            }
            acc.cross_entropy.extend(p.cross_entropy);
        }
        Ok(acc)
    }

    /// The episodes of images `rows`, in that order.
    pub fn rows(&self, rows: &[usize]) -> TokenTrajectory {
        let (p, c) = (self.patches, self.dim);
        let pick = |v: &[f32], w: usize| rows.iter().flat_map(|&i| v[i * w..(i + 1) * w].iter().copied()).collect::<Vec<f32>>();
        TokenTrajectory {
            n: rows.len(),
            patches: p,
            dim: c,
            stages: self
                .stages
                .iter()
                .map(|st| StageRecord { keep: pick(&st.keep, p), alive: pick(&st.alive, p), tokens: pick(&st.tokens, p * c) })
                .collect(),
            cross_entropy: rows.iter().map(|&i| self.cross_entropy[i]).collect(),
        }
    }
}

fn host(t: Tensor<impl Backend, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap_or_default()
}

/// Bernoulli keep decisions restricted to the tokens still alive (`p_keep`, `alive`: `[N·P]`).
pub fn bernoulli_keep(p_keep: &[f32], alive: &[f32], rng: &mut ChaCha8Rng) -> Vec<f32> {
    p_keep.iter().zip(alive).map(|(&pk, &a)| if a > 0.5 && rng.random::<f32>() < pk { 1.0 } else { 0.0 }).collect()
}

/// The k alive tokens of highest keep probability per image of `patches` tokens: the decisions
/// inference makes (ties go to the lower index).
pub fn top_k_keep(p_keep: &[f32], alive: &[f32], patches: usize, k: usize) -> Vec<f32> {
    let mut keep = vec![0.0f32; p_keep.len()];
    for i in 0..p_keep.len() / patches.max(1) {
        let row = i * patches..(i + 1) * patches;
        let mut order: Vec<usize> = row.filter(|&j| alive[j] > 0.5).collect();
        order.sort_by(|&a, &b| p_keep[b].total_cmp(&p_keep[a]).then(a.cmp(&b)));
        for &j in order.iter().take(k) {
            keep[j] = 1.0;
        }
    }
    keep
}

/// How a [`decided_forward`] makes its keep decisions.
pub enum KeepRule<'a> {
    /// Bernoulli samples (the rollout workers); the predictors' inputs are recorded for the
    /// learner to re-evaluate.
    Sample(&'a mut ChaCha8Rng),
    /// Inference's top-k, with the kept count per stage (the learner's backbone forward).
    TopK(&'a [usize]),
}

/// A training-mode forward of `student` with its keep decisions made by `rule`.
pub fn decided_forward<B: crate::ModelBackend>(
    student: &DynamicVit<B>,
    x: Tensor<B, 4>,
    mut rule: KeepRule<'_>,
) -> (TrainOutput<B>, Vec<StageRecord>) {
    let mut stages = Vec::new();
    let out = student.forward_with_decisions(x, &mut |stage, tokens, log_probs, prev| {
        let [n, p, _] = log_probs.dims();
        let p_keep = host(log_probs.detach().narrow(2, 0, 1).reshape([n * p]).exp());
        let alive = host(prev.clone().detach().reshape([n * p]));
        let (keep, tokens) = match &mut rule {
            KeepRule::Sample(rng) => (bernoulli_keep(&p_keep, &alive, rng), host(tokens.clone().detach().flatten(0, 2))),
            KeepRule::TopK(counts) => (top_k_keep(&p_keep, &alive, p, counts[stage]), Vec::new()),
        };
        let t = Tensor::<B, 2>::from_data(TensorData::new(keep.clone(), [n, p]), &prev.device());
        stages.push(StageRecord { keep, alive, tokens });
        t
    });
    (out, stages)
}

/// Per-image cross-entropy `[N]` on the host.
pub fn per_image_ce<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Vec<f32> {
    let n = logits.dims()[0];
    host(log_softmax(logits, 1).gather(1, labels.reshape([n, 1])).reshape([n]).neg())
}

/// Per stage and image: the reward `−λ·|keep_i − ρ_i|`, plus `−CE` at the last stage; and the
/// mean keep ratio per stage.
pub fn pg_rewards(stages: &[StageRecord], ce: &[f32], patches: usize, ratios: &[f64], lambda: f64) -> (Vec<Vec<f32>>, Vec<f64>) {
    let n = ce.len();
    let last = stages.len().saturating_sub(1);
    let mut keep_means = Vec::with_capacity(stages.len());
    let rewards = stages
        .iter()
        .enumerate()
        .map(|(s, st)| {
            let fracs: Vec<f32> =
                (0..n).map(|i| st.keep[i * patches..(i + 1) * patches].iter().sum::<f32>() / patches as f32).collect();
            keep_means.push(fracs.iter().map(|&f| f as f64).sum::<f64>() / n.max(1) as f64);
            fracs
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let r = -(lambda as f32) * (f - ratios[s] as f32).abs();
                    if s == last { r - ce[i] } else { r }
                })
                .collect()
        })
        .collect();
    (rewards, keep_means)
}

/// One worker's episodes: Bernoulli decisions on `images [n, C, H, W]` (row-major).
pub fn rollout_tokens(student: &DynamicVit<Cpu>, images: Vec<f32>, shape: [usize; 4], labels: Vec<i64>, seed: u64) -> Result<TokenTrajectory> {
    let device = Default::default();
    let n = shape[0];
    let x = Tensor::<Cpu, 4>::from_data(TensorData::new(images, shape), &device);
    let y = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(labels, [n]), &device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (out, stages) = decided_forward(student, x, KeepRule::Sample(&mut rng));
    let dims = out.features.dims();
    Ok(TokenTrajectory { n, patches: dims[1], dim: dims[2], stages, cross_entropy: per_image_ce(out.logits, y) })
}

struct TokenJob {
    student: DynamicVit<Cpu>,
    images: Vec<f32>,
    shape: [usize; 4],
    labels: Vec<i64>,
    seed: u64,
}

/// The token predictor's rollout threads.
pub struct TokenRolloutPool {
    pool: WorkerPool<TokenJob, TokenTrajectory>,
}

impl TokenRolloutPool {
    pub fn new(workers: usize) -> Self {
        Self { pool: WorkerPool::new(workers, |j: TokenJob| rollout_tokens(&j.student, j.images, j.shape, j.labels, j.seed)) }
    }

    /// Splits the batch into contiguous shares, one per worker, and merges the trajectories in
    /// worker order.
    pub fn run(&self, student: &DynamicVit<Cpu>, images: &[f32], shape: [usize; 4], labels: &[i64], seed: u64, step: u64) -> Result<TokenTrajectory> {
        let n = shape[0];
        let per = shape[1] * shape[2] * shape[3];
        let w = self.pool.workers().min(n.max(1));
        let jobs = (0..w)
            .map(|wid| {
                let (a, b) = share(n, w, wid);
                TokenJob {
                    student: student.clone(),
                    images: images[a * per..b * per].to_vec(),
                    shape: [b - a, shape[1], shape[2], shape[3]],
                    labels: labels[a..b].to_vec(),
                    seed: worker_seed(seed, step, wid),
                }
            })
            .collect();
        TokenTrajectory::concat(self.pool.run(jobs)?)
    }
}

/// The learner's side: per stage log π(decisions) `[N]` and the mean entropy per live token
/// `[N]` (no value), the predictors re-evaluated on the recorded inputs.
pub fn stage_evals(student: &DynamicVit<Ad>, traj: &TokenTrajectory) -> Vec<StepEvaluation<Ad>> {
    let (n, p, c) = (traj.n, traj.patches, traj.dim);
    let device = Default::default();
    traj.stages
        .iter()
        .zip(&student.vit().score_predictor)
        .map(|(st, predictor)| {
            let tokens = Tensor::<Ad, 3>::from_data(TensorData::new(st.tokens.clone(), [n, p, c]), &device);
            let keep = Tensor::<Ad, 2>::from_data(TensorData::new(st.keep.clone(), [n, p]), &device);
            let alive = Tensor::<Ad, 2>::from_data(TensorData::new(st.alive.clone(), [n, p]), &device);
            let log_probs = predictor.forward(tokens, Some(alive.clone()));
            let lp_keep = log_probs.clone().narrow(2, 0, 1).reshape([n, p]);
            let lp_drop = log_probs.narrow(2, 1, 1).reshape([n, p]);
            // Tokens already dropped are not decided again: they contribute nothing.
            let chosen = (lp_keep.clone() * keep.clone() + lp_drop.clone() * (keep.neg() + 1.0)) * alive.clone();
            let ent = (lp_keep.clone().exp() * lp_keep + lp_drop.clone().exp() * lp_drop).neg() * alive.clone();
            let live = alive.sum_dim(1).reshape([n]).clamp_min(1.0);
            StepEvaluation { log_prob: chosen.sum_dim(1).reshape([n]), entropy: ent.sum_dim(1).reshape([n]) / live, value: None }
        })
        .collect()
}

/// PPO's update of the predictors from one rollout batch (`[rl] algorithm = "ppo"`): advantages
/// `returns − baseline` per stage (normalised if configured; the predictor has no critic, so no
/// GAE), then `[rl.ppo] epochs` passes of shuffled minibatches of `minibatch` images on the clipped
/// surrogate minus the entropy bonus. Only the predictors' gradients are applied. Returns the
/// model, the mean entropy and the mean policy loss.
#[allow(clippy::too_many_arguments)]
pub fn ppo_predictors(
    mut student: DynamicVit<Ad>,
    optim: &mut Optimizer<Ad>,
    traj: &TokenTrajectory,
    returns: &[Vec<f32>],
    baseline: &[Vec<f32>],
    cfg: &RlConfig,
    lr: f64,
    shuffle_seed: u64,
) -> Result<(DynamicVit<Ad>, f64, f64)> {
    let mut adv: Vec<Vec<f32>> =
        returns.iter().zip(baseline).map(|(r, b)| r.iter().zip(b).map(|(r, b)| r - b).collect()).collect();
    if cfg.normalize_advantages {
        normalize(&mut adv);
    }
    let old_lp: Vec<Vec<f32>> = stage_evals(&student, traj).into_iter().map(|e| host(e.log_prob.inner())).collect();
    let device = Default::default();
    let mut rng = ChaCha8Rng::seed_from_u64(shuffle_seed);
    let mut order: Vec<usize> = (0..traj.n).collect();
    let (mut updates, mut sum_entropy, mut sum_policy) = (0usize, 0f64, 0f64);
    for _ in 0..cfg.ppo.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks(cfg.minibatch.max(1)) {
            let m = rows.len();
            let pick = |src: &[Vec<f32>], t: usize| {
                Tensor::<Ad, 1>::from_data(TensorData::new(rows.iter().map(|&i| src[t][i]).collect::<Vec<f32>>(), [m]), &device)
            };
            let evals = stage_evals(&student, &traj.rows(rows));
            let t_len = evals.len().max(1) as f64;
            let mut policy = Tensor::<Ad, 1>::zeros([1], &device);
            let mut entropy = Tensor::<Ad, 1>::zeros([1], &device);
            for (t, StepEvaluation { log_prob: lp, entropy: ent, .. }) in evals.into_iter().enumerate() {
                let (surrogate, _) = clipped_surrogate(lp, pick(&old_lp, t), pick(&adv, t), cfg.ppo.clip as f32);
                policy = policy - surrogate.mean();
                entropy = entropy + ent.mean();
            }
            let (policy, entropy) = (policy / t_len, entropy / t_len);
            let loss = policy.clone() - entropy.clone() * cfg.entropy_bonus;
            let mut raw = loss.backward();
            let grads = GradientsParams::from_module(&mut raw, &student.vit().score_predictor);
            student = optim.step(student, grads, lr, 1.0);
            sum_entropy += entropy.into_scalar().elem::<f64>();
            sum_policy += policy.into_scalar().elem::<f64>();
            updates += 1;
        }
    }
    let u = updates.max(1) as f64;
    Ok((student, sum_entropy / u, sum_policy / u))
}

#[cfg(test)]
mod tests {
    use burn::module::AutodiffModule;

    use super::*;
    use crate::backbones::dynamicvit::DynamicVitArgs;

    #[test]
    fn sampled_decisions_never_revive_dropped_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = 4;
        let probs = [0.99f32, 0.99, 0.01, 0.6, 0.99, 0.99, 0.99, 0.99];
        let alive = [1.0f32, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let top2 = top_k_keep(&probs, &alive, p, 2);
        assert_eq!(top2, vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        let top1 = top_k_keep(&probs, &alive, p, 1);
        assert_eq!(top1, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], "ties go to the lower index");
        let mut kept3 = 0;
        for _ in 0..400 {
            let s = bernoulli_keep(&probs, &alive, &mut rng);
            assert_eq!((s[1], s[6], s[7]), (0.0, 0.0, 0.0), "dropped tokens stay dropped");
            kept3 += s[3] as usize;
        }
        // Token 3 is kept with probability 0.6.
        assert!((200..280).contains(&kept3), "{kept3}");
    }

    #[test]
    fn rewards_price_each_stage_gap_and_charge_ce_at_the_last() {
        let stage = |keep: Vec<f32>| StageRecord { alive: vec![1.0; 4], keep, tokens: vec![] };
        let stages = [stage(vec![1.0, 1.0, 1.0, 0.0]), stage(vec![1.0, 0.0, 0.0, 0.0])];
        let (r, keep) = pg_rewards(&stages, &[0.5], 4, &[0.5, 0.25], 2.0);
        assert_eq!(keep, vec![0.75, 0.25]);
        assert!((r[0][0] + 0.5).abs() < 1e-6, "{r:?}"); // −2·|0.75 − 0.5|
        assert!((r[1][0] + 0.5).abs() < 1e-6, "{r:?}"); // −2·0 − CE 0.5
    }

    fn tiny_student() -> DynamicVit<Ad> {
        let args = DynamicVitArgs {
            img_size: 8,
            patch_size: 2,
            in_chans: 1,
            num_classes: 3,
            embed_dim: 8,
            depth: 3,
            num_heads: 2,
            pruning_loc: vec![1, 2],
            token_ratio: vec![0.7, 0.49],
            ..Default::default()
        };
        <Ad as Backend>::seed(&Default::default(), 3);
        DynamicVit::from_args(&args, &Default::default()).unwrap()
    }

    #[test]
    fn workers_reproduce_and_the_learner_re_evaluates_what_they_sampled() {
        let student = tiny_student();
        let snap = student.valid();
        let n = 6;
        let images: Vec<f32> = (0..n * 64).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5).collect();
        let labels: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
        let two = TokenRolloutPool::new(2);
        let a = two.run(&snap, &images, [n, 1, 8, 8], &labels, 7, 0).unwrap();
        let b = two.run(&snap, &images, [n, 1, 8, 8], &labels, 7, 0).unwrap();
        assert_eq!(a, b, "same seed, step and worker count");
        assert_eq!((a.n, a.patches, a.dim, a.stages.len()), (n, 16, 8, 2));
        let c = two.run(&snap, &images, [n, 1, 8, 8], &labels, 7, 1).unwrap();
        assert_ne!(a.stages[0].keep, c.stages[0].keep, "another step draws other decisions");
        // The learner's log-probabilities come from the predictors on the recorded inputs: they
        // equal a direct evaluation of the decisions (first stage: all tokens alive).
        let evals = stage_evals(&student, &a);
        let lp: Vec<f32> = host(evals[0].log_prob.clone().inner());
        let tokens = Tensor::<Cpu, 3>::from_data(TensorData::new(a.stages[0].tokens.clone(), [n, 16, 8]), &Default::default());
        let direct = snap.vit().score_predictor[0].forward(tokens, None);
        let direct: Vec<f32> = host(direct.flatten(0, 2));
        for i in 0..n {
            let want: f32 = (0..16).map(|j| {
                let k = a.stages[0].keep[i * 16 + j];
                if k > 0.5 { direct[(i * 16 + j) * 2] } else { direct[(i * 16 + j) * 2 + 1] }
            }).sum();
            assert!((lp[i] - want).abs() < 1e-4, "image {i}: {} vs {want}", lp[i]);
        }
        // Dropped tokens stay dropped at the second stage.
        for (k, alive) in a.stages[1].keep.iter().zip(&a.stages[1].alive) {
            assert!(*k <= *alive);
        }
    }
}
