//! Logging: TensorBoard event files, progress bars, and the run's text log.

pub mod progress;
pub mod runlog;
pub mod tensorboard;

pub use runlog::{attach_run_log, flush_run_log, init};
