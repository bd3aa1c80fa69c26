//! `mesh-bench report`: runs every benchmark, each as a subprocess of this binary with the
//! parameters issue 9 asks for, and writes `BENCHMARKS.md`: the machine, the exact commands,
//! the load average before and after each run, and every figure next to its goal and, for the
//! relay, its gossipsub baseline from the same run.
//!
//! `--quick` runs every benchmark smaller (to check the suite, not to quote); `--only` and
//! `--skip` choose benchmarks by name. A benchmark that fails is reported as failed with the
//! end of its error output, and the others still run.

mod machine;
mod markdown;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::relay::load_average;
use crate::report::Report;

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Smaller runs of every benchmark (fewer messages, rounds and seconds).
    #[arg(long)]
    pub quick: bool,
    /// Only these benchmarks (comma separated): protocol, seen-cache, storage, provider, relay,
    /// api, node, memory, scale, e2e, netns.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip these benchmarks (comma separated, names as for --only).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// The Markdown file to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Also write every benchmark's JSON document here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Longest time one benchmark may take, in minutes (it is killed after that).
    #[arg(long, default_value_t = 20)]
    pub timeout_mins: u64,
    /// Seconds of pause before each benchmark, so that the previous one's load fades.
    #[arg(long, default_value_t = 5)]
    pub pause_secs: u64,
}

/// One benchmark run of the suite.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The benchmark's name (`--only`).
    pub name: &'static str,
    /// A heading for the report.
    pub title: &'static str,
    /// Why it runs with these parameters.
    pub why: &'static str,
    /// Arguments of `mesh-bench`.
    pub args: Vec<String>,
}

/// What a run gave.
#[derive(Debug)]
pub struct Outcome {
    /// The plan.
    pub planned: Planned,
    /// Load average before and after.
    pub load: (String, String),
    /// Wall time, seconds.
    pub secs: f64,
    /// The JSON document, or why there is none.
    pub result: Result<serde_json::Value, String>,
}

fn planned(name: &'static str, title: &'static str, why: &'static str, args: &[&str]) -> Planned {
    let mut all = vec![name.to_owned()];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    Planned { name, title, why, args: all }
}

/// The suite, full or quick.
pub fn plan(quick: bool) -> Vec<Planned> {
    let q = |full: &'static [&'static str], small: &'static [&'static str]| -> Vec<&'static str> {
        if quick { [full, small].concat() } else { full.to_vec() }
    };
    vec![
        planned(
            "protocol",
            "Protocol: seal and verify 50-price batches (one core)",
            "issue 2: >= 15,000 verified batches/s on one core",
            &q(&[], &["--batches", "4000"]),
        ),
        planned(
            "seen-cache",
            "Seen cache: lookups and inserts",
            "issue 2: >= 5M lookups/s",
            &q(&[], &["--ops", "1000000"]),
        ),
        planned(
            "storage",
            "Storage: PostgreSQL batch upserts, Redis mirror, round lease",
            "issue 4: >= 100k rows/s in large batches, Redis mirror p99 < 2 ms",
            &q(&[], &["--rows", "40000", "--iterations", "1000"]),
        ),
        planned(
            "provider",
            "Provider: Birdeye client and round loop against birdeye-sim",
            "issue 5",
            &q(&[], &["--requests", "400", "--rounds", "20"]),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 100 nodes, 10 batches/s",
            "issue 3/9: 100 % delivery, p99 < 20 ms at 100 nodes, copies <= degree - 1, one \
             node >= 15,000 unique messages/s; 10 batches/s keeps both systems below \
             saturation on two cores, so latency is the relay's and not the queueing's",
            &q(
                &["--nodes", "100", "--rate", "10"],
                &["--batches", "60", "--relay-messages", "10000"],
            ),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 100 nodes, 10 batches/s, CPUs kept awake",
            "issue 3/9: the run above with the virtual CPUs kept from halting between \
             messages (--keep-cpus-awake: one SCHED_IDLE spinner per CPU in another process, \
             which takes no CPU time from the relays). The difference to the run above is the \
             hypervisor waking idle CPUs; what is left is the relays' own work",
            &q(
                &["--nodes", "100", "--rate", "10", "--skip-relay-rate", "--keep-cpus-awake"],
                &["--batches", "60"],
            ),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 300 nodes, 5 batches/s",
            "issue 9: p99 <= 0.5 x gossipsub's at 300 nodes, 100 % delivery",
            &q(&["--nodes", "300", "--rate", "5", "--skip-relay-rate"], &["--batches", "40"]),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 100 nodes, 10 batches/s, 5 providers",
            "the 100-node run with the batches of 5 providers, as a mesh has them, instead of one \
             per node: tree push (one tree per origin) carries each provider's later batches \
             with one copy per node; repeat_publisher_p99 leaves out each provider's first batch",
            &q(
                &["--nodes", "100", "--rate", "10", "--publishers", "5", "--skip-relay-rate"],
                &["--batches", "60"],
            ),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 300 nodes, 5 batches/s, 5 providers",
            "the 300-node run with 5 providers",
            &q(
                &["--nodes", "300", "--rate", "5", "--publishers", "5", "--skip-relay-rate"],
                &["--batches", "40"],
            ),
        ),
        planned(
            "relay",
            "Relay vs gossipsub, 100 nodes, 50 batches/s (stress: saturates two cores)",
            "the same comparison at the rate that saturates this machine",
            &q(&["--nodes", "100", "--rate", "50", "--skip-relay-rate"], &["--batches", "100"]),
        ),
        planned(
            "api",
            "HTTP API and WebSocket fan-out",
            "issue 7: >= 50k req/s with p99 < 1 ms; 1,000 WebSocket clients p99 < 5 ms. The \
             tcp_floor figures send the same events to as many bare TCP clients from two plain \
             threads: the least any server pays on this machine",
            &q(&[], &["--seconds", "3", "--ws-clients", "200", "--ws-events", "30"]),
        ),
        planned(
            "node",
            "Full nodes: round start to every consumer's book (20 nodes); idle node RSS",
            "issue 6: idle consumer RSS <= 32 MB",
            &q(&[], &["--rounds", "3"]),
        ),
        planned(
            "memory",
            "Consumer process memory, idle and under 100 batches/s",
            "issue 9: RSS <= 32 MB idle and under load",
            &q(&[], &["--seconds", "15", "--idle-secs", "5"]),
        ),
        planned(
            "scale",
            "Scale: 1,000 relays in one process, TTL 10 and TTL 5",
            "issue 9: 100 % delivery, p99 < 1 s to every node",
            &q(&[], &["--nodes", "300", "--batches", "20"]),
        ),
        planned(
            "e2e",
            "End to end: birdeye-sim -> provider -> 20-node mesh -> mesh-api -> WebSocket",
            "issue 9: round start to client p99 < 50 ms on loopback",
            &q(&[], &["--rounds", "5"]),
        ),
        planned(
            "netns",
            "Real link latency: 16 mesh-node processes in network namespaces, 50 ms + 1 % loss per link",
            "issue 9: propagation p99 against diameter x 50 ms; delivery at 1 % loss",
            &q(&[], &["--rounds", "3"]),
        ),
    ]
}

/// Runs the suite and writes the report.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let known: Vec<&str> = plan(false).iter().map(|p| p.name).collect();
    for name in args.only.iter().chain(&args.skip) {
        anyhow::ensure!(known.contains(&name.as_str()), "unknown benchmark {name:?}: {known:?}");
    }
    let selected: Vec<Planned> = plan(args.quick)
        .into_iter()
        .filter(|p| args.only.is_empty() || args.only.iter().any(|o| o == p.name))
        .filter(|p| !args.skip.iter().any(|s| s == p.name))
        .collect();
    let machine = machine::Machine::read();
    let suite_load_before = load_average();
    let started = std::time::Instant::now();
    let exe = std::env::current_exe()?;
    let mut outcomes = Vec::new();
    for p in selected {
        eprintln!("mesh-bench report: {} ({})", p.args.join(" "), p.title);
        std::thread::sleep(Duration::from_secs(args.pause_secs));
        let before = load_average();
        let t = std::time::Instant::now();
        let result = if p.name == "netns" && !machine::is_root() {
            Err("not run: needs root (network namespaces)".to_owned())
        } else {
            run_one(&exe, &p.args, Duration::from_secs(args.timeout_mins * 60))
        };
        if let Err(e) = &result {
            eprintln!("mesh-bench report: {} failed: {e}", p.name);
        }
        outcomes.push(Outcome {
            planned: p,
            load: (before, load_average()),
            secs: t.elapsed().as_secs_f64(),
            result,
        });
    }
    let suite_load_after = load_average();
    let text = markdown::render(
        &machine,
        &outcomes,
        args,
        (&suite_load_before, &suite_load_after),
        started.elapsed(),
    );
    std::fs::write(&args.out, text)?;
    if let Some(path) = &args.json {
        let docs: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(v) => json!({ "command": o.planned.args, "document": v }),
                Err(e) => json!({ "command": o.planned.args, "error": e }),
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&docs)?)?;
    }
    let failed: Vec<String> =
        outcomes.iter().filter(|o| o.result.is_err()).map(|o| o.planned.args.join(" ")).collect();
    Ok(Report {
        bench: "report",
        params: json!({
            "out": args.out.display().to_string(),
            "runs": outcomes.len(),
            "failed": failed,
            "elapsed_secs": started.elapsed().as_secs_f64(),
        }),
        figures: Vec::new(),
    })
}

/// The last lines of a failed run's output before any backtrace: with `RUST_BACKTRACE` set, an
/// error or a panic message is followed by dozens of frames, and the message is what matters.
fn tail(output: &str) -> String {
    let before_backtrace =
        output.to_ascii_lowercase().find("stack backtrace:").map_or(output, |at| &output[..at]);
    let lines: Vec<&str> =
        before_backtrace.lines().rev().filter(|l| !l.trim().is_empty()).take(12).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Runs `exe args` with a deadline; its stdout must be one JSON document.
fn run_one(
    exe: &std::path::Path,
    args: &[String],
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", exe.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        None => Err(format!("killed after {} min\n{}", timeout.as_secs() / 60, tail(&stderr))),
        Some(s) if !s.success() => Err(format!("exited with {s}\n{}", tail(&stderr))),
        Some(_) => serde_json::from_str(&stdout)
            .map_err(|e| format!("its output is not JSON ({e}): {}", tail(&stdout))),
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn a_failure_shows_the_message_not_the_backtrace() {
        let anyhow = "log line\nError: not every node has 8 peers\n\nStack backtrace:\n   0: \
                      main\n             at src/main.rs:1:1\n   1: _start\n";
        assert_eq!(tail(anyhow), "log line\nError: not every node has 8 peers");
        let panic = "thread 'main' panicked at src/x.rs:3:5:\nboom\nstack backtrace:\n   0: f\n";
        assert_eq!(tail(panic), "thread 'main' panicked at src/x.rs:3:5:\nboom");
        let long: String = (1..=20).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&long).lines().count(), 12);
        assert!(tail(&long).ends_with("line 20"));
    }
}
