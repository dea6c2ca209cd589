//! The command line: clap definitions (parsing) and the dispatch to the library (running).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::device::DeviceSpec;
use crate::experiment::Experiment;
use crate::train::run::Resume;
use crate::train::supervised::{self, TrainOptions};

#[derive(Debug, Parser)]
#[command(
    name = "rlprune",
    version,
    about = "Input-adaptive pruning of vision networks: backbones, pruning controllers trained with policy gradients, TensorBoard logging.",
    long_about = "rlprune trains backbones and pruning controllers described by an experiment TOML file.\n\n\
        Quick start:  rlprune train experiments/quickstart.toml\n\
        Then:         tensorboard --logdir runs\n\n\
        Every key of the experiment file can be overridden with --set key=value (dotted path, TOML value)."
)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the experiment's model; writes a run directory with config, metrics, TensorBoard events and checkpoints.
    Train {
        /// Experiment file (TOML).
        experiment: PathBuf,
        /// Override a key, e.g. --set data.batch_size=64 --set train.optimizer.lr=0.1 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run directory to write (default: <log.dir>/<name>/<timestamp>).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Continue a run: "auto" picks the newest run of this experiment's name, or give its directory.
        #[arg(long, value_name = "auto|DIR")]
        resume: Option<Resume>,
        /// Stop after this many completed epochs (the run can be resumed later).
        #[arg(long, value_name = "N")]
        stop_after_epoch: Option<usize>,
        /// Device to train on (overrides the experiment's `device` and `devices`).
        #[arg(long, value_name = "cpu|cuda|cuda:N")]
        device: Option<String>,
    },
    /// Evaluate a trained run (or an experiment with --checkpoint): top-1 and loss on the test split.
    Eval {
        /// A run directory (uses its config.toml) or an experiment file.
        target: PathBuf,
        /// Weights to evaluate (default: the run's checkpoints/best.safetensors, else last).
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// Override a key of the configuration (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Device to evaluate on (overrides the configuration's `device`).
        #[arg(long, value_name = "cpu|cuda|cuda:N")]
        device: Option<String>,
    },
    /// Run a reference model (model TOML + weights) on `input` of a safetensors file; writes `output` (logits).
    Infer {
        /// Model TOML: one [model] table with `family` and the reference constructor arguments.
        #[arg(long, value_name = "MODEL.toml")]
        model: PathBuf,
        /// Weights with the reference key names (.safetensors or a PyTorch .pth zip; no pickle code is run).
        #[arg(long, value_name = "W")]
        weights: PathBuf,
        /// safetensors file with tensor `input` [N, C, H, W].
        #[arg(long, value_name = "X.safetensors")]
        input: PathBuf,
        /// safetensors file to write with tensor `output`.
        #[arg(long, value_name = "Y.safetensors")]
        output: PathBuf,
        /// Device to run on.
        #[arg(long, value_name = "cpu|cuda|cuda:N", default_value = "cpu")]
        device: String,
    },
    /// List the named model variants with parameters and GMACs (224×224, 1000 classes; CIFAR nets at 32×32).
    Zoo {
        /// One JSON object per line: {"name", "params", "gmacs"}.
        #[arg(long)]
        json: bool,
    },
    /// Parameters and GMACs per stage of a zoo model or a model TOML.
    Flops {
        /// A zoo name (see `rlprune zoo`) or a model TOML file.
        model: String,
    },
    /// Download or check datasets.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum DataAction {
    /// Download a dataset from its official URL and verify its checksum (needs network).
    Fetch {
        /// mnist | fashion-mnist | cifar10 | cifar100
        dataset: String,
        /// Target directory (default: data/<name>).
        #[arg(long, value_name = "D")]
        dir: Option<PathBuf>,
    },
    /// Open a dataset where rlprune would find it and print a summary.
    Check {
        /// mnist | fashion-mnist | cifar10 | cifar100
        dataset: String,
        /// Directory to look in (default: the discovery order of `train`).
        #[arg(long, value_name = "D")]
        dir: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    match cli.command {
        Command::Train { experiment, mut set, out, resume, stop_after_epoch, device } => {
            with_device_override(&mut set, device.as_deref())?;
            let (exp, layered) = Experiment::load(&experiment, &set)?;
            let opts = TrainOptions { out, resume, stop_after_epoch, base_dir: cwd };
            let summary = supervised::train(&exp, &layered, &opts)?;
            if let Some(m) = summary.history.last() {
                println!(
                    "{}: epoch {}: test top-1 {:.2}% (best {:.2}%), run {}",
                    exp.name,
                    summary.epochs_done,
                    100.0 * m.test_top1,
                    100.0 * summary.best_top1,
                    summary.run_dir.display()
                );
            }
            if summary.interrupted {
                bail!("interrupted: run {} can be continued with --resume {}", summary.run_dir.display(), summary.run_dir.display());
            }
            Ok(())
        }
        Command::Eval { target, checkpoint, mut set, json, device } => {
            with_device_override(&mut set, device.as_deref())?;
            let report = supervised::eval_target(&target, checkpoint.as_deref(), &set, &cwd)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{:<12} {}", "run", report["source"].as_str().unwrap_or(""));
                println!("{:<12} {}", "arch", report["arch"].as_str().unwrap_or(""));
                println!("{:<12} {}", "weights", report["weights"].as_str().unwrap_or(""));
                println!("{:<12} {}", "images", report["images"]);
                println!("{:<12} {:.2}%", "top-1", 100.0 * report["top1"].as_f64().unwrap_or(f64::NAN));
                println!("{:<12} {:.4}", "loss", report["loss"].as_f64().unwrap_or(f64::NAN));
            }
            Ok(())
        }
        Command::Infer { model, weights, input, output, device } => {
            let device = DeviceSpec::select(Some(&device), "cpu")?;
            crate::backbones::spec::infer_on(&model, &weights, &input, &output, device)?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Command::Zoo { json } => {
            let entries = crate::backbones::zoo::zoo();
            if !json {
                println!("{:<18} {:>14} {:>9} {:>5}", "name", "params", "GMACs", "img");
            }
            for e in entries {
                if json {
                    println!("{}", serde_json::json!({"name": e.name, "params": e.params, "gmacs": e.gmacs}));
                } else {
                    println!("{:<18} {:>14} {:>9.3} {:>5}", e.name, e.params, e.gmacs, e.img_size);
                }
            }
            Ok(())
        }
        Command::Flops { model } => {
            let path = Path::new(&model);
            let report = if path.is_file() {
                let spec = crate::backbones::model_from_toml(path)?;
                spec.cost_native()
            } else {
                crate::backbones::zoo::zoo_entry(&model)?.cost
            };
            print!("{report}");
            Ok(())
        }
        Command::Data { action } => match action {
            DataAction::Fetch { dataset, dir } => {
                let path = crate::data::fetch(&dataset, dir.as_deref(), &cwd)?;
                println!("{dataset}: downloaded and verified into {}", path.display());
                Ok(())
            }
            DataAction::Check { dataset, dir } => {
                println!("{}", crate::data::check(&dataset, dir.as_deref(), &cwd)?);
                Ok(())
            }
        },
    }
}

/// `--device X` as overrides `device = "X"`, `devices = []`, after checking `X` (so that a
/// CUDA request on a CPU-only build is one clear error naming the flag).
pub fn with_device_override(overrides: &mut Vec<String>, device: Option<&str>) -> Result<()> {
    if let Some(d) = device {
        let spec = DeviceSpec::select(Some(d), "cpu")?;
        overrides.push(format!("device=\"{spec}\""));
        overrides.push("devices=[]".into());
    }
    Ok(())
}

/// Resolves `eval`'s target: a run directory (its `config.toml`) or an experiment file.
pub fn experiment_of(target: &Path) -> Result<PathBuf> {
    if target.is_dir() {
        let cfg = target.join("config.toml");
        if !cfg.is_file() {
            bail!("{}: not a run directory (no config.toml)", target.display());
        }
        Ok(cfg)
    } else {
        Ok(target.to_path_buf())
    }
}
