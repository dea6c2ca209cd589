//! Run logging: TensorBoard event files.

pub mod tensorboard;
