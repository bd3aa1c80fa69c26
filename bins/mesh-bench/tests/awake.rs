//! The CPU keeper of `mesh-bench relay --keep-cpus-awake`: its threads run in the `SCHED_IDLE`
//! class (so they take no CPU time from the benchmark), and it ends with its parent, also when
//! the parent is killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-bench");
/// `SCHED_IDLE` in `/proc/<pid>/task/<tid>/stat` (field 41, `policy`).
const SCHED_IDLE: u32 = 5;

/// The scheduling policy of each thread of `pid`, main thread included.
fn policies(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split_whitespace().nth(38)?.parse().ok()
        })
        .collect()
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

fn wait_for(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn spinners_run_at_idle_priority() {
    let mut keeper = Command::new(BIN)
        .args(["awake", "--threads", "2", "--parent", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the keeper");
    let pid = keeper.id();
    // The main thread waits; the two spinners are SCHED_IDLE.
    wait_for("two SCHED_IDLE threads", Duration::from_secs(20), || {
        policies(pid).iter().filter(|&&p| p == SCHED_IDLE).count() == 2
    });
    assert_eq!(policies(pid).len(), 3, "main thread and two spinners");
    keeper.kill().expect("kill the keeper");
    keeper.wait().expect("reap the keeper");
}

#[test]
fn keeper_ends_with_its_parent() {
    // A shell starts the keeper as its child, prints its pid and is then killed: the keeper
    // must not outlive it.
    let mut shell = Command::new("sh")
        .args(["-c", r#""$0" awake --threads 1 --parent $$ & echo $!; wait"#, BIN])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sh");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shell.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read the keeper's pid");
    let keeper: u32 = line.trim().parse().expect("a pid");
    wait_for("the keeper spinning", Duration::from_secs(20), || {
        policies(keeper).contains(&SCHED_IDLE)
    });
    shell.kill().expect("kill sh");
    shell.wait().expect("reap sh");
    wait_for("the keeper ended", Duration::from_secs(20), || ended(keeper));
}

#[test]
fn keeper_of_a_gone_parent_ends_at_once() {
    // A parent id that is not its parent: it was reparented before it could arm the signal.
    let status = Command::new(BIN)
        .args(["awake", "--threads", "1", "--parent", &u32::MAX.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("run the keeper");
    assert!(status.success(), "{status}");
}
