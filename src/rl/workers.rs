//! A fixed set of worker threads for rollouts, shared by every controller's policy-gradient
//! training: the learner scatters one job per worker (a policy snapshot, a read-only model
//! snapshot and a share of the batch), each worker runs its job and sends the result back over a
//! crossbeam channel, and the learner gathers the results in worker order. What a job computes is
//! the controller's business (`rl::rollout` for the channel router,
//! `methods::token_predictor` for the token predictor).
//!
//! Each worker sets its convolutions' thread count to `cores / workers` (at least 1), so N
//! workers split the cores instead of oversubscribing them (see `nn::conv`).

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};
use crossbeam_channel::{Receiver, Sender, unbounded};

type Work<J, R> = Arc<dyn Fn(J) -> Result<R> + Send + Sync>;

/// `workers` threads running `work` on the jobs they are sent.
pub struct WorkerPool<J: Send + 'static, R: Send + 'static> {
    jobs: Vec<Sender<J>>,
    results: Receiver<(usize, Result<R>)>,
    handles: Vec<JoinHandle<()>>,
}

/// Convolution threads per worker when `workers` share the machine: `cores / workers`, at
/// least 1.
pub fn threads_per_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

impl<J: Send + 'static, R: Send + 'static> WorkerPool<J, R> {
    /// `workers` threads, each with [`threads_per_worker`] convolution threads.
    pub fn new(workers: usize, work: impl Fn(J) -> Result<R> + Send + Sync + 'static) -> Self {
        Self::with_compute_threads(workers, threads_per_worker(workers), work)
    }

    /// `workers` threads whose kernels each use `compute_threads` threads.
    pub fn with_compute_threads(
        workers: usize,
        compute_threads: usize,
        work: impl Fn(J) -> Result<R> + Send + Sync + 'static,
    ) -> Self {
        let work: Work<J, R> = Arc::new(work);
        let (res_tx, results) = unbounded::<(usize, Result<R>)>();
        let mut jobs = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers.max(1) {
            let (tx, rx) = unbounded::<J>();
            let res_tx = res_tx.clone();
            let work = work.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rollout-{w}"))
                .spawn(move || {
                    crate::nn::pool::set_thread_compute_threads(compute_threads.max(1));
                    for job in rx.iter() {
                        if res_tx.send((w, work(job))).is_err() {
                            break;
                        }
                    }
                })
                .unwrap_or_else(|e| panic!("cannot spawn rollout thread: {e}"));
            jobs.push(tx);
            handles.push(handle);
        }
        Self { jobs, results, handles }
    }

    pub fn workers(&self) -> usize {
        self.jobs.len()
    }

    /// Sends job i to worker i (at most one job per worker) and returns the results in job order.
    pub fn run(&self, jobs: Vec<J>) -> Result<Vec<R>> {
        if jobs.len() > self.workers() {
            return Err(anyhow!("{} jobs for {} rollout workers", jobs.len(), self.workers()));
        }
        let w = jobs.len();
        for (wid, (tx, job)) in self.jobs.iter().zip(jobs).enumerate() {
            tx.send(job).map_err(|_| anyhow!("rollout worker {wid} has stopped"))?;
        }
        let mut parts: Vec<Option<R>> = (0..w).map(|_| None).collect();
        for _ in 0..w {
            let (wid, r) = self.results.recv().map_err(|_| anyhow!("rollout workers have stopped"))?;
            parts[wid] = Some(r.map_err(|e| e.context(format!("rollout worker {wid}")))?);
        }
        Ok(parts.into_iter().flatten().collect())
    }
}

/// The contiguous share `[a, b)` of `n` items that worker `wid` of `w` takes.
pub fn share(n: usize, w: usize, wid: usize) -> (usize, usize) {
    (wid * n / w, (wid + 1) * n / w)
}

impl<J: Send + 'static, R: Send + 'static> Drop for WorkerPool<J, R> {
    fn drop(&mut self) {
        self.jobs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
