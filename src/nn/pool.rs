//! The compute threads that every CPU kernel splits its work over.
//!
//! The kernels used to spawn fresh OS threads for every call (`std::thread::scope`). A fresh
//! thread also starts with an empty thread-local GEMM workspace, which `gemm` allocates and
//! the kernel then faults in page by page: per call, on every thread but the caller. In a
//! DynamicViT forward at two threads (about 130 kernel calls) that left the second core idle
//! for a tenth of the time. These threads are started once and keep their workspaces.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Environment variable `matrixmultiply` (burn-ndarray's matmul, for the few products that do
/// not go through the project's own ops) reads once, at its first GEMM, for its thread count.
pub const MATRIXMULTIPLY_THREADS_VAR: &str = "MATMUL_NUM_THREADS";

/// The process-wide limit of [`limit_compute_threads`]; 0: all cores.
static LIMIT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// [`set_thread_compute_threads`]; 0: the process-wide setting.
    static THIS_THREAD: Cell<usize> = const { Cell::new(0) };
}

fn cores() -> usize {
    // `available_parallelism` reads the cgroup files on every call (an open and a read per
    // convolution showed in `perf` of a routed forward), so it is asked once.
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The threads a kernel called from this thread may split its work over: this thread's own
/// setting ([`set_thread_compute_threads`]), else the process's ([`limit_compute_threads`]),
/// else all cores. The one thread setting of the CPU backend.
pub fn compute_threads() -> usize {
    match (THIS_THREAD.with(Cell::get), LIMIT.load(Ordering::Relaxed)) {
        (0, 0) => cores(),
        (0, n) | (n, _) => n,
    }
}

/// Sets [`compute_threads`] for the calling thread only (`0`: back to the process's setting):
/// N rollout workers with one thread each get N-way parallelism instead of competing for the
/// same cores.
pub fn set_thread_compute_threads(threads: usize) {
    THIS_THREAD.with(|c| c.set(threads));
}

/// Limits every kernel of the process to `threads` threads ([`compute_threads`]), and
/// `matrixmultiply` too ([`MATRIXMULTIPLY_THREADS_VAR`]; it caps the value at 4).
///
/// `matrixmultiply` reads its variable once, at its first product, so this must run before the
/// process computes anything, while it is still single-threaded (the CLI calls it first thing).
pub fn limit_compute_threads(threads: usize) {
    LIMIT.store(threads, Ordering::Relaxed);
    // SAFETY: `set_var` races with concurrent environment reads in other threads; callers run
    // this before starting any thread that reads the environment (the CLI does it before
    // building a model; the Ctrl-C handler thread only waits on a signal pipe).
    unsafe { std::env::set_var(MATRIXMULTIPLY_THREADS_VAR, threads.to_string()) };
}

fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        // The calling thread runs one part itself, so one thread fewer than cores: a pool thread
        // that waits for work spins for a while, and one per core would compete with the
        // caller's serial work between kernels.
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores().saturating_sub(1).max(1))
            .thread_name(|i| format!("rlprune-compute-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs every task, the first on the calling thread and the others on the pool, and returns
/// their results in order. A panic in a task is resumed on the caller.
pub(crate) fn join_all<R: Send, F: FnOnce() -> R + Send>(tasks: Vec<F>) -> Vec<R> {
    if tasks.len() <= 1 {
        return tasks.into_iter().map(|t| t()).collect();
    }
    let mut results: Vec<Option<R>> = tasks.iter().map(|_| None).collect();
    match pool() {
        Some(pool) => pool.in_place_scope(|s| {
            let mut jobs = tasks.into_iter().zip(results.iter_mut());
            let (first, first_slot) = jobs.next().expect("two tasks or more");
            for (task, slot) in jobs {
                s.spawn(move |_| *slot = Some(task()));
            }
            *first_slot = Some(first());
        }),
        None => std::thread::scope(|s| {
            for (task, slot) in tasks.into_iter().zip(results.iter_mut()) {
                s.spawn(move || *slot = Some(task()));
            }
        }),
    }
    results.into_iter().map(|r| r.expect("every task ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::join_all;

    #[test]
    fn results_come_back_in_order_and_panics_reach_the_caller() {
        let tasks: Vec<_> = (0..7).map(|i| move || i * i).collect();
        assert_eq!(join_all(tasks), vec![0, 1, 4, 9, 16, 25, 36]);
        let mut data = vec![0u32; 10];
        let tasks: Vec<_> = data.chunks_mut(3).enumerate().map(|(i, c)| move || c.fill(i as u32)).collect();
        join_all(tasks);
        assert_eq!(data, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
        let caught = std::panic::catch_unwind(|| {
            let tasks: Vec<_> = (0..3).map(|i| move || assert_ne!(i, 1, "task 1 fails")).collect();
            join_all(tasks);
        });
        assert!(caught.is_err());
    }
}
