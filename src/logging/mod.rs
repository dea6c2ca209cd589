//! Logging: TensorBoard event files, progress bars, the run's text log, and what its plots share.

pub mod plot;
pub mod progress;
pub mod runlog;
pub mod tensorboard;

pub use runlog::{attach_run_log, flush_run_log, init};
