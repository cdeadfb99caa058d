//! A suite's result: rows of measurements and goals with their ratios,
//! printed as a table and written as JSON beside the build.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use comfy_table::Table;
use serde::Serialize;

/// One measurement: `value` of `metric` (in `unit`) for `system` in `case`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub case: String,
    pub system: String,
    pub metric: String,
    pub unit: String,
    pub value: f64,
}

/// Which way a goal's metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    #[allow(dead_code, reason = "guest-boot aims low; throughput suites use it")]
    Higher,
    Lower,
}

/// A goal: `measured` against `target`. `ratio` is measured / target, so
/// with `Better::Higher` a ratio ≥ 1 meets it and with `Better::Lower` a
/// ratio ≤ 1 does.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Goal {
    pub metric: String,
    pub target: f64,
    pub measured: f64,
    pub ratio: f64,
    pub met: bool,
}

impl Goal {
    pub fn new(metric: impl Into<String>, target: f64, measured: f64, better: Better) -> Self {
        let ratio = if target == 0.0 {
            f64::NAN
        } else {
            measured / target
        };
        let met = match better {
            Better::Higher => measured >= target,
            Better::Lower => measured <= target,
        };
        Goal {
            metric: metric.into(),
            target,
            measured,
            ratio,
            met,
        }
    }
}

/// The machine a suite ran on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
}

impl Host {
    pub fn current() -> Self {
        Host {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
        }
    }
}

/// Everything one suite run produced.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub suite: String,
    pub git_rev: String,
    pub host: Host,
    pub rows: Vec<Row>,
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn new(suite: &str) -> Self {
        Report {
            suite: suite.to_owned(),
            git_rev: git_rev(),
            host: Host::current(),
            rows: Vec::new(),
            goals: Vec::new(),
        }
    }

    pub fn row(&mut self, case: &str, system: &str, metric: &str, unit: &str, value: f64) {
        self.rows.push(Row {
            case: case.to_owned(),
            system: system.to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            value,
        });
    }

    pub fn goal(&mut self, goal: Goal) {
        self.goals.push(goal);
    }

    /// The table a person reads after a run.
    pub fn render(&self) -> String {
        let mut rows = Table::new();
        rows.set_header(["case", "system", "metric", "value", "unit"]);
        for r in &self.rows {
            rows.add_row([
                r.case.clone(),
                r.system.clone(),
                r.metric.clone(),
                format!("{:.3}", r.value),
                r.unit.clone(),
            ]);
        }
        let mut out = format!(
            "suite {} at {} on {} cpus, kernel {}\n{rows}\n",
            self.suite, self.git_rev, self.host.cpus, self.host.kernel
        );
        if !self.goals.is_empty() {
            let mut goals = Table::new();
            goals.set_header(["goal", "target", "measured", "ratio", "met"]);
            for g in &self.goals {
                goals.add_row([
                    g.metric.clone(),
                    format!("{:.3}", g.target),
                    format!("{:.3}", g.measured),
                    format!("{:.3}", g.ratio),
                    if g.met { "yes" } else { "NO" }.to_owned(),
                ]);
            }
            out.push_str(&format!("{goals}\n"));
        }
        out
    }

    /// Writes `<dir>/<suite>.json` and returns its path.
    pub fn write_json(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.suite));
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `<cargo target dir>/bench`: `CARGO_TARGET_DIR` when set, else derived
/// from this binary's own path (`<target>/<profile>/basalt-bench`).
pub fn output_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir).join("bench"));
    }
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the benchmark binary is not inside a cargo target directory")?;
    Ok(target.join("bench"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_meet_in_the_right_direction() {
        let g = Goal::new("writes/s vs etcd", 1.5, 1.2, Better::Higher);
        assert!(!g.met);
        assert!((g.ratio - 0.8).abs() < 1e-9);
        let g = Goal::new("p99 ms", 500.0, 250.0, Better::Lower);
        assert!(g.met);
        assert!((g.ratio - 0.5).abs() < 1e-9);
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut r = Report::new("demo");
        r.row("boot", "basalt", "p50", "ms", 12.0);
        r.goal(Goal::new("p50 ms", 10.0, 12.0, Better::Lower));
        let dir = std::env::temp_dir().join(format!("basalt-bench-test-{}", std::process::id()));
        let path = r.write_json(&dir).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for key in ["suite", "git_rev", "host", "rows", "goals"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["rows"][0]["system"], "basalt");
        assert_eq!(v["goals"][0]["met"], false);
        assert!(v["host"]["cpus"].as_u64().unwrap() >= 1);
        std::fs::remove_dir_all(dir).unwrap();
        assert!(r.render().contains("NO"));
    }
}
