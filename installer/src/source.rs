//! Where the answer file comes from, in order: `basalt.answer=URL` on the
//! kernel command line (http, https, file or a path), a partition labelled
//! `BASALT-ANS` holding `answer.yaml`, `basalt/answer.yaml` on the ISO,
//! and, with none of them, questions on the console.
//!
//! Invariant: whatever the source, the text goes through
//! [`AnswerFile::parse`] before the installer acts on it; the questions
//! loop until their answers make a valid file.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::answer::AnswerFile;

/// Where live-boot mounts the ISO.
pub const LIVE_MEDIUM: &str = "/run/live/medium";
/// The label of a partition that carries an answer file.
pub const ANSWER_LABEL: &str = "BASALT-ANS";
/// The kernel command-line parameter that names an answer file.
pub const CMDLINE_PARAM: &str = "basalt.answer";

/// The value of `basalt.answer=` on a kernel command line.
pub fn cmdline_answer(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(CMDLINE_PARAM)?.strip_prefix('='))
        .next_back()
        .filter(|value| !value.is_empty())
}

/// Finds the answer file; returns where it came from and its text.
pub fn find(medium: &Path) -> anyhow::Result<(String, String)> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(url) = cmdline_answer(&cmdline) {
        let text = fetch(url).with_context(|| format!("fetching {CMDLINE_PARAM}={url}"))?;
        return Ok((format!("{CMDLINE_PARAM}={url}"), text));
    }
    let labelled = PathBuf::from(format!("/dev/disk/by-label/{ANSWER_LABEL}"));
    if labelled.exists() {
        let text = read_from_partition(&labelled)?;
        return Ok((format!("the partition labelled {ANSWER_LABEL}"), text));
    }
    let on_iso = medium.join("basalt/answer.yaml");
    if on_iso.exists() {
        let text = std::fs::read_to_string(&on_iso)
            .with_context(|| format!("reading {}", on_iso.display()))?;
        return Ok((on_iso.display().to_string(), text));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!(
            "no answer file: none on the kernel command line ({CMDLINE_PARAM}=URL), no partition labelled {ANSWER_LABEL}, none at {}, and no console to ask on",
            on_iso.display()
        );
    }
    let disks = crate::execute::list_disks().unwrap_or_default();
    let stdin = std::io::stdin();
    let text = ask(&mut stdin.lock(), &mut std::io::stdout(), &disks)?;
    Ok(("questions on the console".into(), text))
}

fn fetch(url: &str) -> anyhow::Result<String> {
    if let Some(path) = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix('/').map(|_| url))
    {
        return std::fs::read_to_string(path).with_context(|| format!("reading {path}"));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{url:?} is not an http(s) or file URL nor an absolute path");
    }
    let out = Command::new("curl")
        .args([
            "-fsSL",
            "--retry",
            "10",
            "--retry-connrefused",
            "--retry-delay",
            "3",
            url,
        ])
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).context("the answer file is not UTF-8")
}

fn read_from_partition(device: &Path) -> anyhow::Result<String> {
    let dir = tempdir("/run/basalt-answer")?;
    let status = Command::new("mount")
        .args(["-o", "ro"])
        .arg(device)
        .arg(&dir)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting {} failed", device.display());
    }
    let result = ["answer.yaml", "answer.yml"]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.exists())
        .with_context(|| format!("{} has no answer.yaml", device.display()))
        .and_then(|path| {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        });
    let _ = Command::new("umount").arg(&dir).status();
    result
}

fn tempdir(path: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {path}"))?;
    Ok(dir)
}

/// Asks for an answer file on a text console until the answers validate;
/// returns the YAML (which the caller parses again, like any source).
pub fn ask(
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    disks: &[crate::disks::Disk],
) -> anyhow::Result<String> {
    writeln!(
        output,
        "Basalt installer: no answer file was found, so a few questions."
    )?;
    loop {
        let text = ask_once(input, output, disks)?;
        match AnswerFile::parse(&text) {
            Ok(_) => {
                writeln!(output, "\nThe answer file:\n{text}")?;
                if ask_line(
                    input,
                    output,
                    "Install with it and ERASE the chosen disks? (yes/no)",
                    "no",
                )? == "yes"
                {
                    return Ok(text);
                }
            }
            Err(err) => writeln!(output, "\nThese answers do not work:\n{err}\nAgain:")?,
        }
    }
}

fn ask_once(
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    disks: &[crate::disks::Disk],
) -> anyhow::Result<String> {
    let mut yaml = String::new();
    let mode = ask_line(
        input,
        output,
        "Create a new cluster or join one? (create/join)",
        "create",
    )?;
    yaml += &format!("mode: {}\n", quote(&mode));
    let name = ask_line(input, output, "Node name (a DNS label)", "n1")?;
    yaml += &format!("node_name: {}\n", quote(&name));
    let address = ask_line(
        input,
        output,
        "Static address with prefix (e.g. 10.0.0.11/24), or dhcp",
        "dhcp",
    )?;
    yaml += "network:\n";
    if address == "dhcp" {
        yaml += "  dhcp: true\n";
    } else {
        yaml += &format!("  address: {}\n", quote(&address));
        let gateway = ask_line(input, output, "Gateway (empty for none)", "")?;
        if !gateway.is_empty() {
            yaml += &format!("  gateway: {}\n", quote(&gateway));
        }
        let dns = ask_line(
            input,
            output,
            "DNS servers, separated by spaces (empty for none)",
            "",
        )?;
        if !dns.is_empty() {
            let list: Vec<String> = dns.split_whitespace().map(quote).collect();
            yaml += &format!("  dns: [{}]\n", list.join(", "));
        }
    }
    writeln!(output, "Disks:")?;
    for disk in disks.iter().filter(|d| d.kind == "disk") {
        writeln!(output, "  {}", disk.describe())?;
    }
    let default_disk = disks
        .iter()
        .find(|d| d.kind == "disk" && !d.read_only)
        .map(|d| d.path.display().to_string())
        .unwrap_or_default();
    let disk = ask_line(input, output, "Install disk (ERASED)", &default_disk)?;
    yaml += &format!("install_disk:\n  path: {}\n", quote(&disk));
    let pool = ask_line(
        input,
        output,
        "Storage pool: a disk path (ERASED) or a file size in GiB",
        "20",
    )?;
    if pool.starts_with('/') {
        yaml += &format!("storage:\n  pool_device: {}\n", quote(&pool));
    } else {
        yaml += &format!("storage:\n  pool_file_gib: {}\n", pool.trim());
    }
    let control = if mode == "join" {
        ask_line(
            input,
            output,
            "A control-plane member's address (host:port)",
            "",
        )?
    } else if address == "dhcp" {
        ask_line(
            input,
            output,
            "Where other nodes reach this one (host:port)",
            "",
        )?
    } else {
        String::new()
    };
    let token = if mode == "join" {
        ask_line(input, output, "Join token (from `basalt token create`)", "")?
    } else {
        String::new()
    };
    if !control.is_empty() || !token.is_empty() {
        yaml += "control_plane:\n";
        if !control.is_empty() {
            yaml += &format!("  address: {}\n", quote(&control));
        }
        if !token.is_empty() {
            yaml += &format!("  join_token: {}\n", quote(&token));
        }
    }
    let key = ask_line(
        input,
        output,
        "An SSH public key for root (empty for none)",
        "",
    )?;
    if !key.is_empty() {
        yaml += &format!("ssh_authorized_keys:\n  - {}\n", quote(&key));
    }
    Ok(yaml)
}

fn ask_line(
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    question: &str,
    default: &str,
) -> anyhow::Result<String> {
    if default.is_empty() {
        write!(output, "{question}: ")?;
    } else {
        write!(output, "{question} [{default}]: ")?;
    }
    output.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        bail!("the console closed before the answers were complete");
    }
    let line = line.trim();
    Ok(if line.is_empty() { default } else { line }.to_owned())
}

/// A YAML double-quoted string.
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_parameter_wins() {
        assert_eq!(
            cmdline_answer("quiet basalt.answer=http://10.0.2.2/a.yaml boot=live"),
            Some("http://10.0.2.2/a.yaml")
        );
        assert_eq!(
            cmdline_answer("basalt.answer=/a basalt.answer=/b"),
            Some("/b")
        );
        assert_eq!(cmdline_answer("basalt.answers=/a basalt.answer="), None);
        assert_eq!(cmdline_answer("quiet"), None);
    }

    #[test]
    fn questions_make_a_valid_file_and_retry_on_errors() {
        let disks = crate::disks::Disk::parse_lsblk(
            r#"{"blockdevices":[{"path":"/dev/vda","size":21474836480,"type":"disk","ro":false}]}"#,
        )
        .unwrap();
        // First round: a bad address (the file names the field), then a
        // good round, then confirmation.
        let script = "join\nn2\n10.0.0.300/24\n\n\n\n20\n10.0.0.11:7400\njoin-n2.abc\n\n\
                      join\nn2\ndhcp\n\n20\n10.0.0.11:7400\njoin-n2.abc\n\nyes\n";
        let mut input = std::io::Cursor::new(script.as_bytes());
        let mut output = Vec::new();
        let text = ask(&mut input, &mut output, &disks).unwrap();
        let shown = String::from_utf8(output).unwrap();
        assert!(
            shown.contains("network.address: not an IPv4 CIDR"),
            "{shown}"
        );
        let answers = AnswerFile::parse(&text).unwrap();
        assert_eq!(answers.node_name.as_str(), "n2");
        assert!(answers.network.dhcp);
        assert_eq!(answers.storage.pool_file_gib, Some(20));
        assert_eq!(
            answers
                .install_disk
                .path
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("/dev/vda")
        );
    }

    #[test]
    fn a_closed_console_is_an_error() {
        let mut input = std::io::Cursor::new(&b"create\n"[..]);
        assert!(ask(&mut input, &mut Vec::new(), &[]).is_err());
    }
}
