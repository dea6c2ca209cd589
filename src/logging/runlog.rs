//! tracing set-up: human-readable logs on stderr, copied into the current run's `log.txt`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Result;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);

/// Writes every log line to stderr and, once a run is attached, to its `log.txt`.
#[derive(Clone, Copy)]
struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        if let Ok(mut guard) = RUN_LOG.lock()
            && let Some(f) = guard.as_mut()
        {
            let _ = f.write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        flush_run_log();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = Tee;
    fn make_writer(&'a self) -> Self::Writer {
        Tee
    }
}

/// Installs the global subscriber (`info` by default; `-v` debug, `-vv` trace; `RUST_LOG` wins).
pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("rlprune={level},warn")));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Tee).with_ansi(false).with_target(false).try_init();
}

/// Copies subsequent log lines into `path` (appending, so a resumed run keeps its history).
pub fn attach_run_log(path: &Path) -> Result<()> {
    let f = crate::fsutil::open_append_no_follow(path)?;
    if let Ok(mut guard) = RUN_LOG.lock() {
        *guard = Some(f);
    }
    Ok(())
}

pub fn flush_run_log() {
    if let Ok(mut guard) = RUN_LOG.lock()
        && let Some(f) = guard.as_mut()
    {
        let _ = f.flush();
        let _ = f.sync_data();
    }
}
