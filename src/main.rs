use clap::Parser;

fn main() {
    if let Err(e) = rlprune::check_cpu_features() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    rlprune::keep_freed_memory();
    let cli = rlprune::cli::Cli::parse();
    rlprune::logging::init(cli.verbose);
    rlprune::session::supervised::install_interrupt_handler();
    if let Err(e) = rlprune::cli::run(cli) {
        rlprune::logging::flush_run_log();
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    rlprune::logging::flush_run_log();
}
