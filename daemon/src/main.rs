//! `basaltd`, the one Basalt daemon binary.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "basaltd", version, about = "The Basalt daemon")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
