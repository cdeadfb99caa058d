//! `basalt-bench`: Basalt's benchmark suites. Each suite measures Basalt
//! side by side with a named peer in one run, prints a table and writes
//! `<cargo target dir>/bench/<suite>.json`.
//!
//! Benchmarks run by hand (`cargo run --release -p basalt-bench -- SUITE`),
//! never in CI: timings on a shared two-core machine are figures to read,
//! not assertions to gate on.

mod report;
mod stats;
mod suites;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "basalt-bench",
    about = "Basalt benchmark suites, side by side with their peers"
)]
struct Args {
    /// The suite to run (`list` prints them).
    suite: String,
    /// Runs per case, for suites that repeat a whole operation.
    #[arg(long)]
    runs: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.suite == "list" {
        for s in suites::ALL {
            println!("{:<12} {}", s.name, s.about);
        }
        return Ok(());
    }
    let Some(suite) = suites::ALL.iter().find(|s| s.name == args.suite) else {
        let names: Vec<_> = suites::ALL.iter().map(|s| s.name).collect();
        anyhow::bail!(
            "unknown suite {:?}; suites: {}",
            args.suite,
            names.join(", ")
        );
    };
    let report = (suite.run)(&suites::Options { runs: args.runs })?;
    print!("{}", report.render());
    let path = report.write_json(&report::output_dir()?)?;
    println!("wrote {}", path.display());
    Ok(())
}
