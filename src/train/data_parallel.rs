//! Data-parallel training on several devices through burn-collective.
//!
//! One thread per device (a *peer*), each with its own replica of the model and optimizer. Every
//! step each peer runs forward and backward on its shard of the batch, then the peers average
//! their gradients with burn-collective's all-reduce (mean, [`GradientsParams::all_reduce`]) and
//! apply the same update, so the replicas stay identical without copying weights around.
//!
//! With equal shards and a loss that is a mean over samples, the averaged gradient equals the
//! gradient of the whole batch on one device — except for layers that couple the samples of a
//! batch: BatchNorm normalises each shard with the shard's own statistics (as PyTorch's
//! DistributedDataParallel does without SyncBatchNorm), and its running statistics are updated
//! from each peer's shard; the trainer checkpoints peer 0's.
//!
//! Two entry points:
//! * [`run_peers`]: runs a closure once per device, each call a registered [`Peer`] that can
//!   all-reduce gradients and numbers. Generic over the autodiff backend; the policy learner can
//!   use it the same way (see docs/gpu.md).
//! * [`Replicas`]: the supervised trainer's form. The calling thread is peer 0 (it owns the run
//!   directory, logs and evaluates); peers 1.. are worker threads fed with their shard of every
//!   batch.

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Result};
use burn::collective::{self, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::backbones::Backbone;
use crate::data::Batch;
use crate::ModelBackend;
use crate::train::optim::Optimizer;

/// burn-collective keeps one local server per backend type, so one process runs one
/// data-parallel group per backend at a time.
static GROUP: Mutex<()> = Mutex::new(());

/// One registered member of a local data-parallel group.
#[derive(Debug, Clone)]
pub struct Peer<B: AutodiffBackend> {
    /// 0..num_peers; also the collective's `PeerId`.
    pub rank: usize,
    pub num_peers: usize,
    pub device: B::Device,
}

impl<B: AutodiffBackend> Peer<B> {
    fn id(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// The rows of an `n`-row batch this peer trains on (contiguous, sizes differ by at most 1).
    pub fn shard(&self, n: usize) -> Range<usize> {
        shard_range(self.rank, self.num_peers, n)
    }

    /// Averages `grads` over all peers (all-reduce, mean); every peer gets the same result. All
    /// peers must pass gradients of the same parameters (replicas of one model).
    pub fn all_reduce_grads(&self, grads: GradientsParams) -> Result<GradientsParams> {
        grads.all_reduce::<B::InnerBackend>(self.id(), ReduceOperation::Mean).map_err(collective_error)
    }

    /// Sums `values` over all peers; every peer gets the totals (f32 on the device, so counts
    /// are exact below 2^24).
    pub fn all_reduce_sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let t = Tensor::<B::InnerBackend, 1>::from_floats(data.as_slice(), &self.device);
        let sum = collective::all_reduce::<B::InnerBackend>(self.id(), t.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(collective_error)?;
        let sum = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(sum));
        Ok(sum.into_data().iter::<f32>().map(f64::from).collect())
    }

    fn register(&self) -> Result<()> {
        let config = CollectiveConfig::default().with_num_devices(self.num_peers);
        collective::register::<B::InnerBackend>(self.id(), self.device.clone(), config).map_err(collective_error)
    }

    fn finish(&self) -> Result<()> {
        collective::finish_collective::<B::InnerBackend>(self.id()).map_err(collective_error)
    }
}

/// Rows `[rank·n/N, (rank+1)·n/N)`.
pub fn shard_range(rank: usize, num_peers: usize, n: usize) -> Range<usize> {
    n * rank / num_peers..n * (rank + 1) / num_peers
}

fn collective_error(e: CollectiveError) -> anyhow::Error {
    anyhow!("burn-collective: {e:?}")
}

/// Wakes peers blocked in a collective call after one peer failed: a reset drops the pending
/// operation, so their calls return an error instead of waiting forever.
fn abort_group<B: AutodiffBackend>() {
    collective::reset_collective::<B::InnerBackend>();
}

/// Runs `work` once per device, each on its own thread as a registered peer of a fresh local
/// collective, and returns the results in rank order. If a peer fails, the others are woken
/// with an error and the first failure is returned.
pub fn run_peers<B, T, F>(devices: &[B::Device], work: F) -> Result<Vec<T>>
where
    B: AutodiffBackend,
    T: Send,
    F: Fn(&Peer<B>) -> Result<T> + Sync,
{
    if devices.is_empty() {
        bail!("data-parallel training needs at least one device");
    }
    let _group = GROUP.lock().unwrap_or_else(|p| p.into_inner());
    collective::reset_collective::<B::InnerBackend>();
    let num_peers = devices.len();
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let work = &work;
                let peer = Peer::<B> { rank, num_peers, device: device.clone() };
                s.spawn(move || {
                    let out = peer.register().and_then(|()| work(&peer));
                    match out {
                        Ok(v) => peer.finish().map(|()| v),
                        Err(e) => {
                            abort_group::<B>();
                            Err(e.context(format!("data-parallel peer {rank}")))
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a data-parallel peer panicked")))).collect()
    });
    results.into_iter().collect()
}

/// What peer 0 sends a worker each step.
struct Job {
    shard: Batch,
    lr: f64,
    /// Epochs done, for models with a training schedule of their own.
    progress: f64,
}

/// What a worker answers: its shard's summed loss and correct count.
/// A worker's answer: its shard's summed loss, correct predictions, and number of images.
type JobResult = Result<(f64, usize, usize)>;

/// What one peer of a data-parallel run computed: how many steps, how many images in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWork {
    pub rank: usize,
    pub steps: u64,
    pub images: usize,
}

/// Peer 0's handle on one worker thread: its job queue, its answers, and the thread.
type Worker = (Sender<Job>, Receiver<JobResult>, JoinHandle<Result<()>>);

/// The trainer's data-parallel group: the calling thread is peer 0, peers 1.. run in worker
/// threads with their own model and optimizer replicas.
pub struct Replicas<B: AutodiffBackend> {
    peer0: Peer<B>,
    workers: Vec<Worker>,
    work: Vec<PeerWork>,
    _group: std::sync::MutexGuard<'static, ()>,
}

/// Passes a replica's gradients through the all-reduce (or unchanged, on one device).
pub type SyncGrads<'a> = &'a dyn Fn(GradientsParams) -> Result<GradientsParams>;

/// One training step of one replica: upload the shard to `device`, forward and backward,
/// gradients through `sync`, update. Returns the new model, the shard's mean loss and its number
/// of correct predictions. The trainer checks the loss after the step, on the whole batch, so
/// that all peers take the same decision.
pub trait StepFn<B: AutodiffBackend, M>:
    Fn(M, &mut Optimizer<B>, &Batch, f64, &B::Device, SyncGrads<'_>) -> Result<(M, f64, usize)> + Send + Sync + Clone + 'static
{
}
impl<B: AutodiffBackend, M, F> StepFn<B, M> for F where
    F: Fn(M, &mut Optimizer<B>, &Batch, f64, &B::Device, SyncGrads<'_>) -> Result<(M, f64, usize)> + Send + Sync + Clone + 'static
{
}

impl<B: AutodiffBackend + ModelBackend> Replicas<B> {
    /// Starts workers on `devices[1..]` with copies of `model` and of `optim`'s state, and
    /// registers everyone (peer 0 on `devices[0]`, the calling thread).
    pub fn start<M, S>(devices: &[B::Device], model: &M, optim: &Optimizer<B>, step: S) -> Result<Self>
    where
        M: AutodiffModule<B> + Backbone<B> + Send + 'static,
        S: StepFn<B, M>,
    {
        if devices.len() < 2 {
            bail!("data-parallel training needs at least two devices, got {}", devices.len());
        }
        let group = GROUP.lock().unwrap_or_else(|p| p.into_inner());
        collective::reset_collective::<B::InnerBackend>();
        let num_peers = devices.len();
        let optim_state = optim.state_dict();
        let mut workers = Vec::new();
        for (rank, device) in devices.iter().enumerate().skip(1) {
            let peer = Peer::<B> { rank, num_peers, device: device.clone() };
            let mut replica_optim = Optimizer::<B>::new(optim.config.clone());
            replica_optim.decay_only_matrices = optim.decay_only_matrices;
            replica_optim.steps = optim.steps;
            replica_optim.load_state_dict(&optim_state, device)?;
            let replica = model.clone().fork(device);
            let (job_tx, job_rx) = channel::<Job>();
            let (res_tx, res_rx) = channel::<JobResult>();
            let step = step.clone();
            let handle = std::thread::Builder::new()
                .name(format!("dp-peer-{rank}"))
                .spawn(move || worker_loop(peer, replica, replica_optim, step, job_rx, res_tx))?;
            workers.push((job_tx, res_rx, handle));
        }
        let peer0 = Peer::<B> { rank: 0, num_peers, device: devices[0].clone() };
        peer0.register()?;
        let work = (0..num_peers).map(|rank| PeerWork { rank, steps: 0, images: 0 }).collect();
        Ok(Self { peer0, workers, work, _group: group })
    }

    pub fn num_peers(&self) -> usize {
        self.peer0.num_peers
    }

    /// One data-parallel step: sends each worker its shard of `batch`, runs peer 0's shard
    /// here, and returns peer 0's new model with the loss and correct count of the whole batch.
    pub fn step<M, S>(&mut self, model: M, optim: &mut Optimizer<B>, batch: &Batch, lr: f64, progress: f64, step: &S) -> Result<(M, f64, usize)>
    where
        M: AutodiffModule<B> + Backbone<B>,
        S: StepFn<B, M>,
    {
        let n = batch.len();
        for (rank, (tx, _, _)) in self.workers.iter().enumerate().map(|(i, w)| (i + 1, w)) {
            let shard = slice_batch(batch, shard_range(rank, self.num_peers(), n));
            if tx.send(Job { shard, lr, progress }).is_err() {
                return Err(worker_stopped(rank));
            }
        }
        let own = slice_batch(batch, self.peer0.shard(n));
        let peer = &self.peer0;
        let sync = |g: GradientsParams| peer.all_reduce_grads(g);
        let result = step(model, optim, &own, lr, &peer.device, &sync);
        let (model, loss0, correct0) = match result {
            Ok(v) => v,
            Err(e) => {
                abort_group::<B>();
                return Err(e);
            }
        };
        let (mut loss_sum, mut correct) = (loss0 * own.len() as f64, correct0);
        self.work[0].steps += 1;
        self.work[0].images += own.len();
        for rank in 1..self.num_peers() {
            match self.workers[rank - 1].1.recv() {
                Ok(Ok((l, c, images))) => {
                    loss_sum += l;
                    correct += c;
                    self.work[rank].steps += 1;
                    self.work[rank].images += images;
                }
                Ok(Err(e)) => return Err(e.context(format!("data-parallel peer {rank}"))),
                Err(_) => return Err(worker_stopped(rank)),
            }
        }
        Ok((model, loss_sum / n.max(1) as f64, correct))
    }

    /// Stops the workers and leaves the collective; returns what each peer computed.
    pub fn finish(mut self) -> Result<Vec<PeerWork>> {
        let workers = std::mem::take(&mut self.workers);
        let mut first_err = None;
        for (tx, _, handle) in workers {
            drop(tx);
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow!("a data-parallel peer panicked"));
                }
            }
        }
        // Peer 0 leaves last: finishing waits for nobody, but keeps the server's peer list sane.
        let r = self.peer0.finish();
        match first_err {
            Some(e) => Err(e),
            None => r.map(|()| std::mem::take(&mut self.work)),
        }
    }
}

fn worker_loop<B, M, S>(peer: Peer<B>, mut model: M, mut optim: Optimizer<B>, step: S, jobs: Receiver<Job>, results: Sender<JobResult>) -> Result<()>
where
    B: AutodiffBackend + ModelBackend,
    M: AutodiffModule<B> + Backbone<B>,
    S: StepFn<B, M>,
{
    peer.register()?;
    let sync = |g: GradientsParams| peer.all_reduce_grads(g);
    while let Ok(job) = jobs.recv() {
        model.set_training_progress(job.progress);
        match step(model, &mut optim, &job.shard, job.lr, &peer.device, &sync) {
            Ok((m, loss, correct)) => {
                model = m;
                if results.send(Ok((loss * job.shard.len() as f64, correct, job.shard.len()))).is_err() {
                    break;
                }
            }
            Err(e) => {
                abort_group::<B>();
                let msg = format!("{e:#}");
                let _ = results.send(Err(e));
                bail!("{msg}");
            }
        }
    }
    peer.finish()
}

fn worker_stopped(rank: usize) -> anyhow::Error {
    anyhow!("data-parallel peer {rank} stopped")
}

/// Rows `range` of a batch (host data; the shard is uploaded by the peer that runs it).
pub fn slice_batch(batch: &Batch, range: Range<usize>) -> Batch {
    let [_, c, h, w] = batch.shape;
    let per = c * h * w;
    Batch {
        images: batch.images[range.start * per..range.end * per].to_vec(),
        labels: batch.labels[range.clone()].to_vec(),
        shape: [range.len(), c, h, w],
        indices: batch.indices[range].to_vec(),
    }
}
