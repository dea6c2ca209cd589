//! The command line: clap definitions (parsing) and the dispatch to the library (running).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};

use crate::device::DeviceSpec;
use crate::session::run::Resume;
use crate::session::supervised::{self, TrainOptions};

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
    /// Train and evaluate a controller experiment at several values of one key (e.g.
    /// --set rl.compute_penalty=0.02,0.05,0.1), plus an optional static baseline; or, given a
    /// trained run, evaluate it at several values without training (e.g. ToMe's
    /// --set backbone.tome.r=2,4,6,8); writes sweep.csv and sweep.png (top-1 against FLOPs and
    /// measured latency).
    Sweep {
        /// Controller experiment file (TOML), or a run directory to evaluate without training.
        experiment: PathBuf,
        /// KEY=V1,V2,... for the swept key (exactly one), KEY=VALUE for fixed overrides (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE[,VALUE...]")]
        set: Vec<String>,
        /// A static baseline experiment (e.g. experiments/static_fashion_mnist.toml), trained on the same backbone.
        #[arg(long = "static", value_name = "STATIC.toml")]
        static_experiment: Option<PathBuf>,
        /// Override a key of the static experiment only (repeatable); the sweep's data.* overrides apply to it too.
        #[arg(long = "static-set", value_name = "KEY=VALUE")]
        static_set: Vec<String>,
        /// Train every point with each of these seeds (comma-separated, e.g. 0,1,2); the plot
        /// shows the mean with the seeds' spread as error bars.
        #[arg(long, value_name = "S1,S2,...", value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Sweep directory (default: <log.dir>/<name>-sweep/<timestamp>).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Run a reference model (model TOML + weights) on `input` of a safetensors file; writes `output` (logits).
    Infer {
        /// A zoo name of a reference model (see `rlprune zoo`) or a model TOML: one [model] table
        /// with `family` and the reference constructor arguments.
        #[arg(long, value_name = "NAME|MODEL.toml")]
        model: String,
        /// Override a model argument, e.g. --set num_classes=10 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
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
    /// Measure images/s and latency per batch of a zoo model or a model TOML: inference, or a
    /// full training step with --train (median over timed repeats after warm-up; peak RSS).
    Bench {
        /// A zoo name (see `rlprune zoo`) or a model TOML file.
        model: String,
        /// Images per step.
        #[arg(long, default_value_t = 8, value_name = "N")]
        batch: usize,
        /// Limit the compute threads of every CPU kernel. Default: all cores.
        #[arg(long, value_name = "T")]
        threads: Option<usize>,
        /// Time a training step (forward, cross-entropy, backward, SGD update) instead of inference.
        #[arg(long)]
        train: bool,
        /// Time the dense forward against a channel-routed forward whose policy keeps every one
        /// of K groups, in alternation (what routing itself costs; CPU inference).
        #[arg(long, value_name = "K", conflicts_with = "train")]
        routed: Option<usize>,
        /// Time a model that prunes inside its forward (a deit model TOML with [model.tome] or
        /// [model.evit], an adahornet) against the same weights with nothing pruned, in
        /// alternation (CPU inference)
        #[arg(long, conflicts_with_all = ["routed", "train"])]
        unreduced: bool,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2, value_name = "W")]
        warmup: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 10, value_name = "R")]
        repeats: usize,
        /// Device to run on: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Input side (default: the model's own; 224 for fully convolutional models).
        #[arg(long, value_name = "S")]
        img_size: Option<usize>,
        /// Classes of the head (default: the model's own).
        #[arg(long, value_name = "C")]
        num_classes: Option<usize>,
        /// Input channels (default: the model's own).
        #[arg(long, value_name = "C")]
        in_chans: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Draw what a token/spatial-pruning model (DynamicViT, AdaHorNet) kept: per image a PNG with the
    /// image and one panel per pruning stage, dropped regions greyed out; plus index.json.
    Visualize {
        /// A run directory (config.toml + checkpoints/), or a model TOML or zoo name (then --weights and --data).
        target: PathBuf,
        /// Number of images (the first ones of the test split or of the input file).
        #[arg(long, default_value_t = 8, value_name = "N")]
        images: usize,
        /// Directory to write image_XXXX.png and index.json into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Weights (.safetensors or .pth); required with a model TOML, overrides a run's checkpoint.
        #[arg(long, value_name = "W")]
        weights: Option<PathBuf>,
        /// Images: a dataset name (its test split) or a safetensors file with tensor `input` [N, C, H, W].
        /// Default for a run directory: the experiment's test split.
        #[arg(long, value_name = "DATASET|X.safetensors")]
        data: Option<String>,
        /// Where the dataset named by --data lives.
        #[arg(long, value_name = "D")]
        data_root: Option<PathBuf>,
        /// Upscaling factor of the panels (default: panels of about 224 pixels).
        #[arg(long, value_name = "K")]
        scale: Option<usize>,
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
        /// Download each file from URL/<file name> (a local copy or a proxy) instead of its
        /// official host; the files are verified against the same checksums.
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
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
            let (resume, exp, layered) =
                crate::session::run::experiment_to_resume(resume, crate::methods::load(&experiment, &set)?, &set, &cwd)?;
            let opts = TrainOptions { out, resume, stop_after_epoch, base_dir: cwd.clone() };
            let summary = crate::methods::train(&exp, &layered, &opts)?;
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
            if let (Some(o), false) = (summary.outcome, summary.interrupted) {
                let run = summary.run_dir.strip_prefix(&cwd).unwrap_or(&summary.run_dir);
                println!(
                    "{}: backbone top-1 {:.2}%, pruned top-1 {:.2}% at FLOPs ratio {:.3} ({:.2}× fewer MACs in the pruned layers)",
                    exp.name,
                    100.0 * o.backbone_top1,
                    100.0 * o.top1,
                    o.flops_ratio,
                    1.0 / o.flops_ratio.max(1e-12)
                );
                println!("measure its speed against the unpruned network: rlprune eval {}", run.display());
            }
            let run = summary.run_dir.display();
            if summary.interrupted {
                if !crate::session::run::has_checkpoint(&summary.run_dir) {
                    bail!("interrupted before the first checkpoint: there is nothing to resume in {run} (it holds only logs; remove it and start again)");
                }
                if supervised::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                    bail!("interrupted: run {run} can be continued with --resume {run}");
                }
                let n = opts.stop_after_epoch.unwrap_or(summary.epochs_done);
                tracing::info!("stopped after epoch {n} as asked (--stop-after-epoch); continue with --resume {run}");
            } else if opts.resume.is_some() && summary.history.is_empty() {
                tracing::info!("run {run} is already complete: nothing left to do");
            }
            Ok(())
        }
        Command::Eval { target, checkpoint, mut set, json, device } => {
            with_device_override(&mut set, device.as_deref())?;
            let report = crate::methods::eval_target(&target, checkpoint.as_deref(), &set, &cwd)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", crate::methods::eval::table(&report));
            }
            Ok(())
        }
        Command::Sweep { experiment, set, static_experiment, static_set, seeds, out } => {
            let opts = crate::sweep::SweepOptions {
                experiment,
                sets: set,
                static_experiment,
                static_sets: static_set,
                seeds,
                out,
                base_dir: cwd,
            };
            let dir = crate::sweep::run_sweep(&opts)?;
            print!("{}", std::fs::read_to_string(dir.join("sweep.csv")).unwrap_or_default());
            println!("wrote {0}/sweep.csv, {0}/sweep_summary.csv and {0}/sweep.png", dir.display());
            Ok(())
        }
        Command::Infer { model, set, weights, input, output, device } => {
            let device = DeviceSpec::select(Some(&device), "cpu")?;
            let spec = crate::backbones::spec::resolve_model(&model, &set)?;
            crate::backbones::spec::infer_on(&spec, &weights, &input, &output, device)?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Command::Zoo { json } => {
            let entries = crate::backbones::zoo::zoo();
            let w = entries.iter().map(|e| e.name.len()).max().unwrap_or(4);
            if !json {
                println!("{:<w$} {:>14} {:>9} {:>5}", "name", "params", "GMACs", "img");
            }
            for e in entries {
                if json {
                    println!("{}", serde_json::json!({"name": e.name, "params": e.params, "gmacs": e.gmacs}));
                } else {
                    println!("{:<w$} {:>14} {:>9.3} {:>5}", e.name, e.params, e.gmacs, e.img_size);
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
            println!("{report}");
            Ok(())
        }
        Command::Bench { model, batch, threads, train, routed, unreduced, warmup, repeats, img_size, num_classes, in_chans, json, device } => {
            use crate::bench;
            if let Some(t) = threads {
                bench::limit_threads(t)?;
            }
            if unreduced {
                if DeviceSpec::select(Some(&device), "cpu")? != DeviceSpec::Cpu {
                    bail!("--unreduced measures the CPU backend only");
                }
                let target = bench::BenchModel::resolve(&model, img_size, num_classes, in_chans)?;
                let report = crate::methods::eval::token_reduction_speedup(&target, batch, warmup, repeats)?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", report.table());
                }
                return Ok(());
            }
            if let Some(groups) = routed {
                if DeviceSpec::select(Some(&device), "cpu")? != DeviceSpec::Cpu {
                    bail!("--routed measures the CPU backend only");
                }
                ensure!(batch >= 1, "--batch must be at least 1");
                let target = bench::BenchModel::resolve(&model, img_size, num_classes, in_chans)?;
                let built = target.build::<crate::Cpu>(&Default::default())?;
                let report = crate::methods::eval::routing_overhead(&model, &built, target.input_shape(batch), groups, warmup, repeats)?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", report.table());
                }
                return Ok(());
            }
            let opts = bench::BenchOptions {
                batch,
                threads,
                train,
                warmup,
                repeats,
                img_size,
                num_classes,
                in_chans,
                device: DeviceSpec::select(Some(&device), "cpu")?,
                ..Default::default()
            };
            let report = bench::bench(&model, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Visualize { target, images, out, weights, data, data_root, scale } => {
            let opts = crate::visualize::VisualizeOptions { target, weights, data, data_root, images, out, scale, base_dir: cwd };
            let drawn = crate::visualize::visualize(&opts)?;
            println!("wrote {} to {}", drawn.summary, opts.out.display());
            Ok(())
        }
        Command::Data { action } => match action {
            DataAction::Fetch { dataset, dir, mirror } => {
                let path = crate::data::fetch(&dataset, dir.as_deref(), &cwd, mirror.as_deref())?;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, run};

    fn toy_lines(run_dir: &std::path::Path) -> Vec<u64> {
        let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["toy_epoch"].as_u64())
            .collect()
    }

    /// The toy method and the toy backbone family (`methods::toy`, `backbones::toy`, built for
    /// tests), each one file plus one registry line, train through `rlprune train`, stop,
    /// resume, log to TensorBoard and evaluate; the family is listed in the zoo.
    #[test]
    fn a_method_and_a_family_in_one_file_each_train_resume_and_evaluate() {
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("toy.toml");
        let text = format!(
            "name = \"toy\"\nseed = 3\n[data]\ndataset = \"synthetic\"\nsize = 8\ntrain_size = 64\ntest_size = 32\nbatch_size = 16\n\
             [backbone]\narch = \"toy-linear\"\n[train]\nepochs = 1\noptimizer = {{ kind = \"sgd\", lr = 0.05 }}\n\
             [controller]\nkind = \"toy\"\nepochs = 3\nlr = 0.01\n[log]\ndir = {:?}\nevery_steps = 1\n",
            dir.path().join("runs").display().to_string()
        );
        std::fs::write(&exp, text).unwrap();
        let out = dir.path().join("run");
        let (e, o) = (exp.display().to_string(), out.display().to_string());
        run(Cli::try_parse_from(["rlprune", "train", &e, "--out", &o, "--stop-after-epoch", "1"]).unwrap()).unwrap();
        assert_eq!(toy_lines(&out), vec![1]);
        run(Cli::try_parse_from(["rlprune", "train", &e, "--resume", &o]).unwrap()).unwrap();
        assert_eq!(toy_lines(&out), vec![1, 2, 3]);
        let events = std::fs::read_dir(&out)
            .unwrap()
            .map(|f| f.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents"))
            .expect("a TensorBoard event file");
        let bytes = std::fs::read(events).unwrap();
        assert!(bytes.windows(8).any(|w| w == b"toy/loss"), "the toy's scalars are in the event file");
        let report = crate::methods::eval_target(&out, None, &[], dir.path()).unwrap();
        assert_eq!(report["controller"], "toy");
        assert!(report["top1"].as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)));
        assert!(crate::backbones::zoo::zoo().iter().any(|z| z.name == "toy-linear" && z.params == 28 * 28 * 10 + 10));
        let bad = crate::methods::load(&exp, &["controller.epochz=2".into()]).unwrap_err();
        assert!(format!("{bad:#}").contains("controller.epochz"), "{bad:#}");
    }
}
