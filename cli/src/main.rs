//! `basalt`, the admin CLI: a thin gRPC client of the control plane.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "basalt", version, about = "The Basalt admin CLI")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
