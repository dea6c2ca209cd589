//! A prefetching batch loader.
//!
//! [`Loader::epoch`] starts `workers` background threads. Worker `w` builds batches
//! `w, w + workers, ...` and sends them through its own bounded crossbeam channel; the consumer
//! reads the channels round-robin, so batches arrive in order and at most about `prefetch`
//! batches wait ready ahead of the consumer.
//!
//! Everything random is a pure function of `(seed, epoch, train)`: the training order is a
//! Fisher-Yates shuffle driven by a ChaCha8 stream seeded from `(seed, epoch)`, and the
//! augmentation of an image is driven by a stream seeded from `(seed, epoch, dataset index)`.
//! So resuming at epoch `e` reproduces the same batches, whatever the number of workers.
//! Evaluation (`train = false`) reads in dataset order without augmentation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::synthetic::mix64;
use super::transforms::Transform;
use super::{Batch, DataConfig, Dataset};

const SHUFFLE_TAG: u64 = 0x5348_5546_464c_4531; // "SHUFFLE1"
const AUGMENT_TAG: u64 = 0x4155_474d_454e_5431; // "AUGMENT1"

/// Batches of one dataset for one purpose (training or evaluation).
pub struct Loader {
    plan: Arc<Plan>,
    /// A configuration error found by [`Loader::new`], reported by the first epoch.
    deferred: Option<String>,
    prefetch: usize,
    workers: usize,
}

/// What a worker needs to build any batch of an epoch.
struct Plan {
    ds: Arc<dyn Dataset>,
    transform: Transform,
    batch_size: usize,
    drop_last: bool,
    train: bool,
    seed: u64,
}

impl Plan {
    fn num_batches(&self) -> usize {
        let n = self.ds.len();
        let b = self.batch_size.max(1);
        if self.train && self.drop_last && n >= b { n / b } else { n.div_ceil(b) }
    }

    fn order(&self, epoch: usize) -> Vec<usize> {
        let n = self.ds.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.train {
            let mut rng = ChaCha8Rng::seed_from_u64(mix64(self.seed ^ mix64(epoch as u64 ^ SHUFFLE_TAG)));
            for i in (1..n).rev() {
                // Uniform in 0..=i by the multiply-shift method (bias < 2^-40 for any dataset size).
                let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    fn batch(&self, epoch: usize, order: &[usize], b: usize) -> anyhow::Result<Batch> {
        let bs = self.batch_size.max(1);
        let start = b * bs;
        let end = (start + bs).min(order.len());
        let indices: Vec<usize> = order.get(start..end).unwrap_or(&[]).to_vec();
        let [c, h, w] = self.transform.output_shape();
        let mut images = Vec::with_capacity(indices.len() * c * h * w);
        let mut labels = Vec::with_capacity(indices.len());
        let classes = self.ds.num_classes();
        for &idx in &indices {
            let sample = self.ds.get(idx)?;
            if sample.label >= classes {
                anyhow::bail!(
                    "{}: image {idx} has label {} but the dataset has {classes} classes",
                    self.ds.describe(),
                    sample.label
                );
            }
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix64(self.seed ^ mix64(epoch as u64 ^ mix64(idx as u64 ^ AUGMENT_TAG))));
            let img = self
                .transform
                .apply(sample.image, &mut rng)
                .map_err(|e| anyhow::anyhow!("{}: image {idx}: {e}", self.ds.describe()))?;
            images.extend_from_slice(&img);
            labels.push(sample.label as i64);
        }
        Ok(Batch { images, labels, shape: [indices.len(), c, h, w], indices })
    }
}

impl Loader {
    /// A loader over `ds` using the batch size (`batch_size` when `train`, else
    /// `eval_batch_size`), prefetch depth, workers, `drop_last` (train only) and transforms of
    /// `cfg`. A configuration that cannot work (e.g. `mean` with the wrong number of channels)
    /// is reported as the first item of every epoch; use [`Loader::try_new`] to get it here.
    pub fn new(ds: Arc<dyn Dataset>, cfg: &DataConfig, train: bool, seed: u64) -> Self {
        match Self::try_new(ds.clone(), cfg, train, seed) {
            Ok(l) => l,
            Err(e) => {
                let transform =
                    Transform { in_shape: ds.image_shape(), resize: None, crop_padding: 0, hflip: false, norm: None };
                let plan = Plan { ds, transform, batch_size: 1, drop_last: false, train, seed };
                Self { plan: Arc::new(plan), deferred: Some(format!("{e:#}")), prefetch: 1, workers: 1 }
            }
        }
    }

    /// Like [`Loader::new`], but returns configuration errors.
    pub fn try_new(ds: Arc<dyn Dataset>, cfg: &DataConfig, train: bool, seed: u64) -> anyhow::Result<Self> {
        // Only the keys that shape batches matter here (the dataset is already open).
        const KEYS: [&str; 8] =
            ["batch_size", "eval_batch_size", "prefetch", "workers", "resize", "random_crop_padding", "mean", "std"];
        let problems = cfg.validate();
        let resize_required = cfg.resize.is_none();
        if let Some((key, msg)) =
            problems.into_iter().find(|(k, _)| KEYS.contains(&k.as_str()) && !(k == "resize" && resize_required))
        {
            anyhow::bail!("data.{key}: {msg}");
        }
        let batch_size = if train { cfg.batch_size } else { cfg.eval_batch_size };
        let transform = Transform::from_config(cfg, ds.image_shape(), train)?;
        let plan = Plan { ds, transform, batch_size, drop_last: cfg.drop_last, train, seed };
        Ok(Self {
            plan: Arc::new(plan),
            deferred: None,
            prefetch: cfg.prefetch.max(1),
            workers: cfg.workers.clamp(1, 64),
        })
    }

    /// For a training loader: fails with the loader's configuration error, when the batch size
    /// exceeds the split (a loader alone would give one partial batch) or when an epoch would
    /// hold no batch.
    pub fn ensure_batches(&self) -> anyhow::Result<()> {
        if let Some(e) = &self.deferred {
            anyhow::bail!("{e}");
        }
        let (batch, n) = (self.plan.batch_size, self.plan.ds.len());
        if batch > n {
            anyhow::bail!(
                "data.batch_size = {batch} is larger than the training split ({n} images in {}); use at most {n}",
                self.plan.ds.describe()
            );
        }
        if self.plan.num_batches() == 0 {
            anyhow::bail!("{}: the split has no full batch (data.batch_size too large?)", self.plan.ds.describe());
        }
        Ok(())
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        if self.deferred.is_some() { 0 } else { self.plan.num_batches() }
    }

    /// Images per batch (the last batch may hold fewer).
    pub fn batch_size(&self) -> usize {
        self.plan.batch_size
    }

    /// `[C, H, W]` of the images in a batch, after resize/crop.
    pub fn output_shape(&self) -> [usize; 3] {
        self.plan.transform.output_shape()
    }

    /// The dataset read.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.plan.ds
    }

    /// The transform applied to each image.
    pub fn transform(&self) -> &Transform {
        &self.plan.transform
    }

    /// The order in which epoch `epoch` visits the dataset (a permutation of `0..len`; identity
    /// for evaluation). Batches are consecutive chunks of it.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        self.plan.order(epoch)
    }

    /// Builds batch `b` of epoch `epoch` on the calling thread (the same batch that
    /// [`Loader::epoch`] yields at position `b`).
    pub fn batch(&self, epoch: usize, b: usize) -> anyhow::Result<Batch> {
        if let Some(e) = &self.deferred {
            anyhow::bail!("{e}");
        }
        if b >= self.num_batches() {
            anyhow::bail!("batch {b} out of range: an epoch has {} batches", self.num_batches());
        }
        self.plan.batch(epoch, &self.plan.order(epoch), b)
    }

    /// Streams the batches of epoch `epoch` from background threads through bounded channels
    /// (depth `prefetch` in all). After an error the stream ends. Dropping the iterator early
    /// stops the threads.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        if let Some(e) = &self.deferred {
            return EpochIter::failed(anyhow::anyhow!("{e}"));
        }
        let total = self.plan.num_batches();
        let workers = self.workers.min(total.max(1));
        let depth = self.prefetch.div_ceil(workers).max(1);
        let order = Arc::new(self.plan.order(epoch));
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = bounded::<anyhow::Result<Batch>>(depth);
            let plan = self.plan.clone();
            let order = order.clone();
            let stop_w = stop.clone();
            let spawned = std::thread::Builder::new().name(format!("rlprune-data-{w}")).spawn(move || {
                for b in (w..total).step_by(workers) {
                    if stop_w.load(Ordering::Relaxed) {
                        break;
                    }
                    let item = plan.batch(epoch, &order, b);
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            });
            match spawned {
                Ok(h) => {
                    receivers.push(rx);
                    handles.push(h);
                }
                Err(e) => {
                    let mut it = EpochIter { receivers, handles, stop, next: 0, total, done: false, pending: None };
                    it.shutdown();
                    return EpochIter::failed(anyhow::anyhow!("cannot start a data loader thread: {e}"));
                }
            }
        }
        EpochIter { receivers, handles, stop, next: 0, total, done: false, pending: None }
    }
}

/// The batches of one epoch, in order (see [`Loader::epoch`]).
pub struct EpochIter {
    receivers: Vec<Receiver<anyhow::Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: usize,
    total: usize,
    done: bool,
    pending: Option<anyhow::Error>,
}

impl EpochIter {
    fn failed(e: anyhow::Error) -> Self {
        Self {
            receivers: Vec::new(),
            handles: Vec::new(),
            stop: Arc::new(AtomicBool::new(true)),
            next: 0,
            total: 0,
            done: false,
            pending: Some(e),
        }
    }

    /// Batches not yet yielded.
    pub fn remaining(&self) -> usize {
        if self.done { 0 } else { self.total - self.next }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Iterator for EpochIter {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending.take() {
            self.done = true;
            return Some(Err(e));
        }
        if self.done || self.next >= self.total || self.receivers.is_empty() {
            return None;
        }
        let b = self.next;
        let rx = &self.receivers[b % self.receivers.len()];
        let item = match rx.recv() {
            Ok(item) => item,
            Err(_) => Err(anyhow::anyhow!("data loader thread stopped before batch {b} (it panicked)")),
        };
        self.next += 1;
        if item.is_err() {
            self.done = true;
            self.shutdown();
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining() + usize::from(self.pending.is_some());
        (0, Some(n))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
