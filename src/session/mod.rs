//! The run session over an experiment: what every method's run starts from (the experiment's
//! data, opened before anything is written; the run directory, new or resumed; the build
//! context), its logs (`metrics.jsonl`, TensorBoard, `config.toml`), checkpoints, the backbone
//! built and loaded for the experiment, and the supervised trainer. Methods run their phases on
//! it.

pub mod run;
pub mod supervised;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::AutodiffBackend;

use crate::ModelBackend;
use crate::backbones::{AnyBackbone, BuildContext};
use crate::data::{self, DataSplits, Loader};
use crate::experiment::{Experiment, Layered};
use crate::train::checkpoint;
use run::{RunLogs, resumed_or_new_run_dir};
use supervised::{INTERRUPTED, TrainOptions, TrainSummary, build_context};

/// Whether a method's run may continue an earlier one (`--resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumable {
    Yes,
    /// Refused with this reason (what to do instead).
    No(&'static str),
}

/// One run of an experiment: data, run directory and build context, opened in that order, so
/// that a run that cannot start (missing data, a refused model) leaves no run directory.
pub struct Session<'a> {
    pub exp: &'a Experiment,
    pub layered: &'a Layered,
    /// The directory relative paths of the experiment resolve against.
    pub base: PathBuf,
    pub splits: DataSplits,
    pub train_loader: Loader,
    pub test_loader: Loader,
    pub ctx: BuildContext,
    pub run_dir: PathBuf,
    /// The run continues an earlier one (its state is read with [`Session::resumed_state`]).
    pub resumed: bool,
    pub started: Instant,
}

impl<'a> Session<'a> {
    /// Opens the data, then the run directory: `opts.resume`'s, `opts.out`, or a fresh
    /// `<log.dir>/<name>/<timestamp>`.
    pub fn open(exp: &'a Experiment, layered: &'a Layered, opts: &TrainOptions, resumable: Resumable) -> Result<Self> {
        Ok(Self::open_with(exp, layered, opts, resumable, |_| Ok(()))?.0)
    }

    /// [`Session::open`] with `preflight` run on the build context before the run directory
    /// exists (what must succeed for a run to start: a memory check, building the model); its
    /// value is returned beside the session.
    pub fn open_with<T>(
        exp: &'a Experiment,
        layered: &'a Layered,
        opts: &TrainOptions,
        resumable: Resumable,
        preflight: impl FnOnce(&BuildContext) -> Result<T>,
    ) -> Result<(Self, T)> {
        if let (Some(_), Resumable::No(why)) = (&opts.resume, resumable) {
            bail!("--resume is not supported for {}", why);
        }
        let base = opts.base_dir.clone();
        let splits = data::open(&exp.data, &base)?;
        let train_loader = Loader::new(splits.train.clone(), &exp.data, true, exp.seed);
        let test_loader = Loader::new(splits.test.clone(), &exp.data, false, exp.seed);
        train_loader.ensure_batches()?;
        let ctx = build_context(splits.train.as_ref(), &train_loader);
        // Bad backbone options are refused before the run directory exists.
        crate::backbones::cost(&exp.backbone.arch, &exp.backbone.options, &ctx).map_err(|e| supervised::backbone_error(layered, e))?;
        let checked = preflight(&ctx)?;
        let (run_dir, resumed) =
            resumed_or_new_run_dir(opts.resume.as_ref(), opts.out.as_deref(), &base.join(&exp.log.dir), exp)?;
        let session = Self { exp, layered, base, splits, train_loader, test_loader, ctx, run_dir, resumed, started: Instant::now() };
        Ok((session, checked))
    }

    /// `checkpoints/` of the run, created.
    pub fn checkpoint_dir(&self) -> Result<PathBuf> {
        let ck = checkpoint::dir(&self.run_dir);
        std::fs::create_dir_all(&ck).with_context(|| format!("{}: cannot create checkpoint directory", ck.display()))?;
        Ok(ck)
    }

    /// The run's logs; a fresh run also records its resolved `config.toml`.
    pub fn logs(&self) -> Result<RunLogs> {
        RunLogs::open(self.exp, &self.base, &self.run_dir, !self.resumed)
    }

    /// A resumed run's method state `checkpoints/<file>` (JSON, checked for our format);
    /// `None` for a fresh run or when the file is not there yet.
    pub fn resumed_state<T: serde::de::DeserializeOwned>(&self, file: &str, format: impl Fn(&T) -> &str) -> Result<Option<T>> {
        let p = checkpoint::dir(&self.run_dir).join(file);
        if !self.resumed || !p.is_file() {
            return Ok(None);
        }
        checkpoint::read_json(&p, format).map(Some)
    }

    /// Refuses to continue a run that was trained with another architecture.
    pub fn check_arch(&self, recorded: &str) -> Result<()> {
        if recorded != self.exp.backbone.arch {
            bail!(
                "{}: run was trained with arch '{recorded}', the experiment builds '{}'",
                self.run_dir.display(),
                self.exp.backbone.arch
            );
        }
        Ok(())
    }

    /// The trained backbone: `[backbone] weights`, or supervised training into `<run>/<sub>/`
    /// (continued when the run is resumed). `Err(summary)` when that training was interrupted.
    pub fn pretrained_backbone<B: AutodiffBackend + ModelBackend>(
        &self,
        sub: &str,
        device: &B::Device,
    ) -> Result<std::result::Result<AnyBackbone<B>, TrainSummary>>
    where
        B::InnerBackend: ModelBackend,
    {
        supervised::pretrained_backbone(self.exp, self.layered, &self.ctx, &self.base, &self.run_dir, sub, self.resumed, device)
    }

    /// Seconds since the session opened.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// What evaluating a finished run starts from: the experiment's test split and the build
/// context (the training split gives the context, as it did when the run was trained).
pub struct EvalData {
    pub splits: DataSplits,
    pub test_loader: Loader,
    pub ctx: BuildContext,
}

impl EvalData {
    pub fn open(exp: &Experiment, base: &std::path::Path) -> Result<Self> {
        let splits = data::open(&exp.data, base)?;
        let test_loader = Loader::new(splits.test.clone(), &exp.data, false, exp.seed);
        let ctx = build_context(splits.train.as_ref(), &test_loader);
        Ok(Self { splits, test_loader, ctx })
    }
}

/// The experiment's architecture with fresh weights, `[backbone] weights` left out: the
/// skeleton a run's own checkpoint is loaded into.
pub fn skeleton<B: ModelBackend>(exp: &Experiment, layered: &Layered, ctx: &BuildContext, base: &std::path::Path, device: &B::Device) -> Result<AnyBackbone<B>> {
    let mut fresh = exp.clone();
    fresh.backbone.weights = None;
    supervised::build_backbone(&fresh, layered, ctx, base, device)
}

/// Ctrl-C was pressed: trainers stop after the current step, write what they have and exit.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The batches of one epoch under a progress bar, ending early when Ctrl-C is pressed: after
/// each batch the loop has taken, the bar advances and the interrupt is polled.
pub struct EpochBatches<I> {
    batches: I,
    bar: indicatif::ProgressBar,
    taken: bool,
    stopped: bool,
}

/// `len` batches of `batches` under a bar labelled `message`.
pub fn epoch_batches<I: Iterator>(batches: I, len: usize, message: &str) -> EpochBatches<I> {
    EpochBatches { batches, bar: crate::logging::progress::bar(len as u64, message), taken: false, stopped: false }
}

impl<I: Iterator> Iterator for EpochBatches<I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        if self.taken {
            self.bar.inc(1);
            if interrupted() {
                self.stopped = true;
                return None;
            }
        }
        self.taken = true;
        self.batches.next()
    }
}

impl<I> EpochBatches<I> {
    /// Clears the bar; whether Ctrl-C ended the epoch.
    pub fn finish(self) -> bool {
        self.bar.finish_and_clear();
        self.stopped
    }
}
