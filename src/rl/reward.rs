//! RNP's reward: `-p * a_t/k` at every decision, plus a final accuracy term.

use super::RlConfig;

/// The final accuracy term for one image.
pub fn accuracy_term(cfg: &RlConfig, cross_entropy: f32, correct: bool) -> f32 {
    match cfg.accuracy_reward.as_str() {
        "correct" => {
            if correct {
                1.0
            } else {
                -(cfg.gamma_wrong as f32)
            }
        }
        _ => -(cfg.alpha as f32) * cross_entropy,
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
