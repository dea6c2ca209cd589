//! RNP's reward: `-p * a_t/k` at every decision (or a FLOPs budget, `[rl] flops_target`), plus
//! a final accuracy term.

use super::RlConfig;

/// The final accuracy term for one image.
pub fn accuracy_term(cfg: &RlConfig, cross_entropy: f32, correct: bool) -> f32 {
    match cfg.accuracy_reward {
        super::AccuracyReward::Correct => {
            if correct {
                1.0
            } else {
                -(cfg.gamma_wrong as f32)
            }
        }
        super::AccuracyReward::NegCe => -(cfg.alpha as f32) * cross_entropy,
    }
}

/// Per-decision rewards `[T][N]`: the compute price of each action, plus `accuracy[i]` at the
/// last decision.
pub fn rewards(actions: &[Vec<usize>], groups: usize, penalty: f64, accuracy: &[f32]) -> Vec<Vec<f32>> {
    let t_last = actions.len().saturating_sub(1);
    actions
        .iter()
        .enumerate()
        .map(|(t, acts)| {
            acts.iter()
                .enumerate()
                .map(|(i, &a)| {
                    let r = -(penalty as f32) * a as f32 / groups as f32;
                    if t == t_last { r + accuracy[i] } else { r }
                })
                .collect()
        })
        .collect()
}

/// Per-decision rewards `[T][N]` under a FLOPs budget: zero until the last decision, which gets
/// `accuracy[i] - p * max(0, r_i - target)`, where `r_i` is image i's spent MACs over the full
/// MACs of the routed layers (`macs[t][i]`, `macs_full[t]`).
pub fn budget_rewards(macs: &[Vec<u64>], macs_full: &[u64], penalty: f64, target: f64, accuracy: &[f32]) -> Vec<Vec<f32>> {
    final_rewards(macs, macs_full, accuracy, |ratio| penalty * (ratio - target).max(0.0))
}

/// Per-decision rewards `[T][N]` under a mean-FLOPs budget held by a Lagrangian price: zero
/// until the last decision, which gets `accuracy[i] - price * (r_i - target)`. Unlike the hinge
/// of [`budget_rewards`], an image below the target is credited for what it saves, so each image
/// trades its own accuracy against the same marginal price.
pub fn priced_rewards(macs: &[Vec<u64>], macs_full: &[u64], price: f64, target: f64, accuracy: &[f32]) -> Vec<Vec<f32>> {
    final_rewards(macs, macs_full, accuracy, |ratio| price * (ratio - target))
}

/// Zero until the last decision, which gets `accuracy[i] - cost(r_i)`.
fn final_rewards(macs: &[Vec<u64>], macs_full: &[u64], accuracy: &[f32], cost: impl Fn(f64) -> f64) -> Vec<Vec<f32>> {
    let full = macs_full.iter().sum::<u64>().max(1) as f64;
    let t_last = macs.len().saturating_sub(1);
    let mut out: Vec<Vec<f32>> = macs.iter().map(|m| vec![0.0; m.len()]).collect();
    if let Some(last) = out.get_mut(t_last) {
        for (i, r) in last.iter_mut().enumerate() {
            let ratio = macs.iter().map(|m| m[i]).sum::<u64>() as f64 / full;
            *r = accuracy[i] - cost(ratio) as f32;
        }
    }
    out
}

/// The price's dual-ascent step after a rollout batch whose mean FLOPs ratio was `mean_ratio`:
/// up when the batch spent over the target, down (not below 0) when it spent less.
pub fn next_price(price: f64, price_lr: f64, mean_ratio: f64, target: f64) -> f64 {
    (price + price_lr * (mean_ratio - target)).max(0.0)
}

/// Returns-to-go with γ = 1 over the decision sequence, `[T][N]`.
pub fn returns_to_go(rewards: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut out = rewards.to_vec();
    for t in (0..out.len().saturating_sub(1)).rev() {
        let (head, tail) = out.split_at_mut(t + 1);
        for (r, next) in head[t].iter_mut().zip(&tail[0]) {
            *r += next;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_charges_only_the_excess_over_the_target_at_the_last_decision() {
        // Two layers of 100 and 300 MACs; image 0 spends 50 + 150 (ratio 0.5), image 1 100 + 300.
        let macs = vec![vec![50, 100], vec![150, 300]];
        let r = budget_rewards(&macs, &[100, 300], 2.0, 0.6, &[-0.1, -0.2]);
        assert_eq!(r[0], vec![0.0, 0.0]);
        assert!((r[1][0] - -0.1).abs() < 1e-6, "under budget: accuracy only, got {}", r[1][0]);
        assert!((r[1][1] - (-0.2 - 2.0 * 0.4)).abs() < 1e-6, "over budget by 0.4, got {}", r[1][1]);
    }

    #[test]
    fn priced_budget_credits_savings_and_its_price_follows_the_mean() {
        let macs = vec![vec![50, 100], vec![150, 300]];
        let r = priced_rewards(&macs, &[100, 300], 2.0, 0.6, &[-0.1, -0.2]);
        assert!((r[1][0] - (-0.1 + 2.0 * 0.1)).abs() < 1e-6, "under budget by 0.1 is credited, got {}", r[1][0]);
        assert!((r[1][1] - (-0.2 - 2.0 * 0.4)).abs() < 1e-6, "over budget by 0.4, got {}", r[1][1]);
        assert!((next_price(2.0, 0.5, 0.8, 0.6) - 2.1).abs() < 1e-12);
        assert!((next_price(2.0, 0.5, 0.4, 0.6) - 1.9).abs() < 1e-12);
        assert_eq!(next_price(0.05, 1.0, 0.4, 0.6), 0.0);
    }
}
