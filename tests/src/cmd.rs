//! Running the host tools the fixtures are built from (`ip`, `virsh`,
//! `useradd`): one place that turns a failed command into an error that
//! shows what ran and what it printed.

use std::fmt::Write as _;
use std::io;
use std::process::{Command, ExitStatus, Stdio};

/// A host command could not be run, or it failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started at all (missing binary, ...).
    #[error("could not start `{command}`")]
    Spawn {
        /// The command line, for the reader.
        command: String,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line, for the reader.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

impl CommandError {
    /// What the failed command printed on stderr (empty if it never ran).
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Spawn { .. } => "",
            CommandError::Failed { stderr, .. } => stderr,
        }
    }
}

/// The command line of `cmd`, as a shell user would read it.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(line, " {}", arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion with stdin closed; returns its stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let command = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Shorthand for running `ip ARGS...`.
pub(crate) fn ip(args: &[&str]) -> Result<String, CommandError> {
    run(Command::new("ip").args(args))
}
