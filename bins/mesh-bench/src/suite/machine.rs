//! What the report says about the machine and the source it ran.

use std::process::Command;

/// The machine and the build.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Logical CPUs (`/proc/cpuinfo`).
    pub cores: usize,
    /// Memory (`/proc/meminfo`), GiB.
    pub ram_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// `rustc --version` on the PATH.
    pub rustc: String,
    /// The commit, and whether the working tree had changes.
    pub commit: String,
    /// When the suite started (UTC).
    pub date: String,
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Machine {
    /// Reads everything it can; unknown fields say so.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let ram_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        let rustc = output("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
        let commit = match output("git", &["rev-parse", "--short=12", "HEAD"]) {
            Some(head) => {
                let changed = output("git", &["status", "--porcelain", "--untracked-files=no"])
                    .map_or(0, |s| s.lines().count());
                if changed == 0 {
                    head
                } else {
                    format!("{head} with {changed} uncommitted changed files")
                }
            }
            None => "unknown (not run in a git checkout)".to_owned(),
        };
        let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
        Self { cpu, cores, ram_gib, kernel, rustc, commit, date }
    }
}

/// Whether this process runs as root (effective uid 0, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
