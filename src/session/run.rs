//! Run directories: `runs/<name>/<timestamp>/` with `config.toml`, `metrics.jsonl`, `log.txt`,
//! TensorBoard events and `checkpoints/`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::experiment::Experiment;
use crate::session::supervised::TrainOptions;
use crate::logging::tensorboard::EventWriter;

/// Which phase of a run draws from burn's global RNG: each seeds it from its own stream at
/// every epoch start, so an epoch draws the same numbers whether or not the process ran the
/// epochs before it (a resumed run is bit-exact at every epoch boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedStream {
    Supervised,
    TokenPredictor,
    Router,
    RouterFineTune,
}

/// The backend seed of `stream`'s epoch `epoch` (`usize::MAX`: before its first epoch).
pub fn epoch_seed(seed: u64, stream: SeedStream, epoch: usize) -> u64 {
    let salt: u64 = match stream {
        SeedStream::Supervised => 0,
        SeedStream::TokenPredictor => 0xD1B5_4A32_D192_ED03,
        SeedStream::Router => 0x524E_505F_524F_5554,
        SeedStream::RouterFineTune => 0x524E_505F_4654_554E,
    };
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(salt ^ (epoch as u64).wrapping_add(1))
}

/// Where a run continues from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest run of the experiment's name that has a checkpoint.
    Auto,
    Dir(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "auto" { Resume::Auto } else { Resume::Dir(PathBuf::from(s)) })
    }
}

/// A fresh run directory `<root>/<name>/<YYYYmmdd-HHMMSS>[-k]`.
pub fn new_run_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
    let base = root.join(name);
    std::fs::create_dir_all(&base).with_context(|| format!("{}: cannot create run directory", base.display()))?;
    for k in 0..1000 {
        let dir = if k == 0 { base.join(&stamp) } else { base.join(format!("{stamp}-{k}")) };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create run directory", dir.display())),
        }
    }
    bail!("{}: too many runs started in the same second", base.display())
}

/// Held for the life of a run: an exclusive lock on `<run_dir>/.lock`, which the operating
/// system releases when the process ends, however it ends.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open the run's lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!("{}: another rlprune process is running in this run directory", run_dir.display())
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("{}: cannot lock", path.display())),
        }
    }
}

/// Claims the run directory `opts` names before anything is written: `--resume auto` resolved
/// to the newest run, a `--out` directory that already holds a run refused (continuing needs
/// `--resume`), and the directory locked for the run's life. A fresh timestamped directory is
/// created later, exclusively, and needs no lock.
pub fn claim_run_dir(exp: &Experiment, opts: &TrainOptions) -> Result<(TrainOptions, Option<RunLock>)> {
    let mut opts = opts.clone();
    if let Some(Resume::Auto) = opts.resume {
        opts.resume = Some(Resume::Dir(newest_run(&opts.base_dir.join(&exp.log.dir), &exp.name)?));
    }
    let dir = match (&opts.resume, &opts.out) {
        (Some(Resume::Dir(d)), _) if d.is_dir() => d.clone(),
        (Some(_), _) | (None, None) => return Ok((opts, None)),
        (None, Some(d)) => {
            let taken = std::fs::read_dir(d).map(|mut it| it.any(|e| e.is_ok_and(|e| e.file_name() != ".lock"))).unwrap_or(false);
            if taken {
                bail!("{}: the directory is not empty: continue the run there with --resume {}, or choose another --out", d.display(), d.display());
            }
            std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create run directory", d.display()))?;
            d.clone()
        }
    };
    let lock = RunLock::acquire(&dir)?;
    Ok((opts, Some(lock)))
}

/// `--set` keys a resumed run may change: how long it runs, its learning rates, how it logs,
/// how its data are loaded. Every other key stays as the run's `config.toml` has it.
pub const RESUMABLE_KEYS: &[&str] = &[
    "train.epochs",
    "train.optimizer",
    "train.grad_clip",
    "train.eval_every",
    "rl.epochs",
    "rl.finetune_epochs",
    "rl.lr",
    "rl.backbone_lr",
    "rl.finetune_lr",
    "controller.epochs",
    "controller.fine_tune_epochs",
    "controller.fine_tune_lr",
    "log",
    "data.workers",
    "data.prefetch",
    "data.eval_batch_size",
    "device",
];

/// The experiment a `--resume` continues: the run's own `config.toml` (when it has one), with
/// those of `sets` that change a key of [`RESUMABLE_KEYS`]. A set that would change any other
/// key is refused, naming the key and the run's value; `seed` is left to
/// [`check_resumed_seed`]. Returns the run's config file and the sets to apply to it (none
/// when the run has no `config.toml`).
pub fn resumed_config(run_dir: &Path, sets: &[String]) -> Result<Option<(PathBuf, Vec<String>)>> {
    let cfg = run_dir.join("config.toml");
    if !cfg.is_file() {
        return Ok(None);
    }
    let (recorded, _) = Experiment::load(&cfg, &[]).with_context(|| format!("{}: the run's configuration", run_dir.display()))?;
    let recorded_table = toml::Table::try_from(&recorded).context("reading the run's configuration")?;
    let mut kept = Vec::new();
    for set in sets {
        let key = set.split_once('=').map(|(k, _)| k.trim()).unwrap_or(set.as_str());
        let (changed, _) = Experiment::load(&cfg, std::slice::from_ref(set))?;
        if toml::Table::try_from(&changed).context("reading the run's configuration")? == recorded_table {
            continue;
        }
        let may_change =
            key == "seed" || RESUMABLE_KEYS.iter().any(|k| key == *k || key.starts_with(&format!("{k}.")));
        if !may_change {
            let root = toml::Value::Table(recorded_table.clone());
            let old = key
                .split('.')
                .try_fold(&root, |v, part| v.get(part))
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .unwrap_or_else(|| "its default".to_string());
            bail!(
                "--set {set}: {}: the run was started with {key} '{old}', and a resumed run keeps its configuration \
                 (it continues from {}); only these keys may change on resume: {}",
                run_dir.display(),
                cfg.display(),
                RESUMABLE_KEYS.join(", ")
            );
        }
        kept.push(set.clone());
    }
    Ok(Some((cfg, kept)))
}

/// `out` (created if missing) when the user gave `--out`, else a fresh `<root>/<name>/<timestamp>`.
pub fn out_or_new_run_dir(out: Option<&Path>, root: &Path, name: &str) -> Result<PathBuf> {
    match out {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create run directory", d.display()))?;
            Ok(d.to_path_buf())
        }
        None => new_run_dir(root, name),
    }
}

/// The run directory of a controller run: the one `--resume` names (auto: the newest run of
/// the experiment's name with a checkpoint), else `--out` or a fresh one. The flag says whether
/// it is resumed.
pub fn resumed_or_new_run_dir(resume: Option<&Resume>, out: Option<&Path>, root: &Path, exp: &Experiment) -> Result<(PathBuf, bool)> {
    let dir = match resume {
        Some(Resume::Auto) => newest_run(root, &exp.name)?,
        Some(Resume::Dir(d)) => d.clone(),
        None => return Ok((out_or_new_run_dir(out, root, &exp.name)?, false)),
    };
    check_resumed_seed(&dir, exp)?;
    Ok((dir, true))
}

/// Every random stream of a run derives from its seed, so a resumed run keeps the seed its
/// `config.toml` records; another seed (`--set seed=...`) would continue a different run.
pub fn check_resumed_seed(run_dir: &Path, exp: &Experiment) -> Result<()> {
    let path = run_dir.join("config.toml");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{}: not a valid run config", path.display()))?;
    if let Some(seed) = table.get("seed").and_then(|v| v.as_integer())
        && seed as u64 != exp.seed
    {
        bail!(
            "{}: the run was started with seed {seed}, the experiment now says seed {}: a resumed run keeps its seed; \
             resume without changing it, or start a new run",
            run_dir.display(),
            exp.seed
        );
    }
    Ok(())
}

/// The logs every run keeps: `log.txt` (attached to tracing), `metrics.jsonl` and, when
/// `[log] tensorboard`, the event file.
pub struct RunLogs {
    pub metrics: MetricsLog,
    pub tb: Option<EventWriter>,
}

impl RunLogs {
    /// Opens the logs of `run_dir`. A fresh run also records the resolved experiment, as
    /// `config.toml` and as TensorBoard text; a resumed one appends and keeps its original.
    /// Relative paths in the experiment resolve against `base` (the directory the command runs
    /// in); `config.toml` records them absolute, so that the run works from anywhere.
    pub fn open(exp: &Experiment, base: &Path, run_dir: &Path, fresh: bool) -> Result<Self> {
        crate::logging::attach_run_log(&run_dir.join("log.txt"))?;
        let config_toml = exp.with_absolute_paths(base).to_toml()?;
        if fresh {
            crate::fsutil::atomic_write(&run_dir.join("config.toml"), config_toml.as_bytes())?;
        }
        let metrics = MetricsLog::open(run_dir)?;
        if !fresh {
            remove_empty_event_files(run_dir);
        }
        let mut tb = if exp.log.tensorboard { Some(EventWriter::create(run_dir)?) } else { None };
        if let (Some(tb), true) = (tb.as_mut(), fresh) {
            tb.text("config", 0, &format!("```toml\n{config_toml}\n```"))?;
        }
        Ok(Self { metrics, tb })
    }
}

/// A process killed before its first TensorBoard flush leaves an empty event file; a resumed
/// run removes them (files with events are kept: TensorBoard reads them all).
fn remove_empty_event_files(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return };
    for e in entries.flatten() {
        let empty = e.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
        if empty && e.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The newest run of `name` under `root` that has a checkpoint: `checkpoints/state.json`, or for
/// controller runs their method's state (`checkpoints/rnp_state.json`, `static_state.json`,
/// `token_predictor_state.json`) or a phase-1 `backbone/` or `teacher/checkpoints/state.json`.
pub fn newest_run(root: &Path, name: &str) -> Result<PathBuf> {
    let base = root.join(name);
    let entries = std::fs::read_dir(&base)
        .with_context(|| format!("--resume auto: no runs of '{name}' under {}", base.display()))?;
    let mut runs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| has_checkpoint(p)).collect();
    runs.sort();
    runs.pop().with_context(|| format!("--resume auto: no run of '{name}' under {} has a checkpoint", base.display()))
}

/// Appends one JSON object per line and flushes it, so the file is always valid up to the
/// last complete line.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = crate::fsutil::open_append_no_follow(&path)?;
        Ok(Self { file, path })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.file.write_all(&line).with_context(|| format!("{}: write failed", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

/// Whether `run` holds a checkpoint a resume can start from (see [`newest_run`]).
pub fn has_checkpoint(run: &Path) -> bool {
    [
        "checkpoints/state.json",
        "checkpoints/rnp_state.json",
        "checkpoints/static_state.json",
        "checkpoints/token_predictor_state.json",
        "backbone/checkpoints/state.json",
        "teacher/checkpoints/state.json",
    ]
        .iter()
        .any(|f| run.join(f).is_file())
}

/// Resolves `--resume` to its run directory and the experiment it continues: the run's own
/// `config.toml` with the allowed `--set` changes ([`resumed_config`]), recorded into that
/// `config.toml` (under the run's lock, atomically) when they change anything. Without
/// `--resume`, or for a run without `config.toml`, the experiment file's.
pub fn experiment_to_resume(
    resume: Option<Resume>,
    experiment: (Experiment, crate::experiment::Layered),
    sets: &[String],
    base: &Path,
) -> Result<(Option<Resume>, Experiment, crate::experiment::Layered)> {
    let (exp, layered) = experiment;
    let dir = match resume {
        None => return Ok((None, exp, layered)),
        Some(Resume::Auto) => newest_run(&base.join(&exp.log.dir), &exp.name)?,
        Some(Resume::Dir(d)) => d,
    };
    let Some((cfg, kept)) = resumed_config(&dir, sets)? else { return Ok((Some(Resume::Dir(dir)), exp, layered)) };
    let (resumed, layered) = Experiment::load(&cfg, &kept)?;
    check_resumed_seed(&dir, &resumed)?;
    if !kept.is_empty() {
        let _lock = RunLock::acquire(&dir)?;
        crate::fsutil::atomic_write(&cfg, resumed.with_absolute_paths(base).to_toml()?.as_bytes())?;
        tracing::info!("resuming {} with {}; recorded in its config.toml", dir.display(), kept.join(" "));
    }
    Ok((Some(Resume::Dir(dir)), resumed, layered))
}
