//! Controllers: the policies that decide, at each decision point of a backbone, how much of the
//! next layer to compute. [`channel_router`] is RNP's recurrent channel-group router;
//! [`policy::SequencePolicy`] is what the RL algorithms train, which the router implements. The
//! decision protocol ([`Controller`], [`DecisionPoint`], [`Trace`]) is defined beside the
//! backbones that call it (`backbones::controlled`) and re-exported here; DynamicViT's token
//! predictor is part of its backbone's weights (`backbones::token_predictor`). The recipes that
//! train and evaluate controllers (the methods) sit above this layer.

pub mod channel_router;
pub mod policy;


use serde::{Deserialize, Serialize};

pub use crate::backbones::controlled::{Controller, Decision, DecisionPoint, Mode, Trace, TraceStep, channels_for};
pub use policy::{ActionRule, SequencePolicy, StepEvaluation, StepOutput};

/// `[controller]`. The router keys are typed here; every other key is collected in `options`
/// and checked by the kind's own `check_options` (serde cannot combine `flatten` with
/// `deny_unknown_fields`, so unknown keys are rejected there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// The method that trains the controller: `"channel-router"` (RNP), `"static-l1"` or
    /// `"token-predictor"` (checked by the method registry).
    pub kind: String,
    /// Channel groups per decision layer (k).
    #[serde(default = "default_groups")]
    pub groups: usize,
    /// Encoder output and GRU hidden size.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Recurrent cell: `"gru"` or `"lstm"`.
    #[serde(default)]
    pub rnn: RnnCell,
    /// Keys specific to the kind (e.g. `static-l1`'s `target_flops`).
    #[serde(flatten, default, skip_serializing_if = "toml::Table::is_empty")]
    pub options: toml::Table,
}

impl ControllerConfig {
    /// The kind-specific keys (`options`) as the kind's typed options `T`; errors as (key,
    /// message), an unknown key named as such.
    pub fn kind_options<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, (String, String)> {
        serde_path_to_error::deserialize::<_, T>(toml::Value::Table(self.options.clone())).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.inner().to_string().trim_end().to_string();
            if let Some(rest) = msg.strip_prefix("unknown field `")
                && let Some(name) = rest.split('`').next()
            {
                return (name.to_string(), format!("is not a key of controller '{}' (unknown key; {msg})", self.kind));
            }
            (path, msg)
        })
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self { kind: "channel-router".into(), groups: 4, hidden: 64, rnn: RnnCell::Gru, options: toml::Table::new() }
    }
}

fn default_groups() -> usize {
    4
}
fn default_hidden() -> usize {
    64
}

choice! {
    /// `[controller] rnn`: the channel router's recurrent cell.
    #[derive(Default)]
    pub enum RnnCell { #[default] Gru = "gru", Lstm = "lstm" }
    invalid: |s| format!("'{s}' is not a known cell (available: {})", RnnCell::NAMES.join(", "))
}

impl ControllerConfig {
    /// Problems as (key relative to `[controller]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if !(1..=64).contains(&self.groups) {
            v.push(("groups".into(), format!("must be in 1..=64, got {}", self.groups)));
        }
        if !(1..=4096).contains(&self.hidden) {
            v.push(("hidden".into(), format!("must be in 1..=4096, got {}", self.hidden)));
        }
        v
    }
}
