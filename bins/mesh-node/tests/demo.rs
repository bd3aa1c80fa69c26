//! `mesh-node demo` as a user meets it (the main job, `scripts/run`): the terminal shows the
//! banner, then one line per round and nothing else at the default level; the nodes' logs go
//! to one file per node; Ctrl-C (SIGINT) stops everything cleanly and says so in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-node");
/// Round length of the demo under test (seconds).
const INTERVAL: u64 = 3;
/// Longest wait for the demo to show prices, on a slow shared machine.
const WAIT: Duration = Duration::from_secs(120);

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of the demo's stdout as they come, on a channel (a thread reads the pipe).
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn is_round_line(line: &str) -> bool {
    line.starts_with("round ") && line.contains(" providers ") && line.ends_with(" peers")
}

#[test]
fn the_demo_prints_a_banner_one_line_per_round_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .env_remove("RUST_LOG")
        .args(["demo", "--interval", &INTERVAL.to_string(), "--api-listen", "127.0.0.1:0"])
        .arg("--demo-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>()
    });
    let rx = lines(&mut child);
    let mut demo = Running(child);

    // Banner first, then round lines; wait for two rounds whose prices all came that round.
    let mut banner = Vec::new();
    let mut rounds = Vec::new();
    let deadline = Instant::now() + WAIT;
    while rounds.iter().filter(|l: &&String| l.contains(" 9/9 assets updated")).count() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no two full rounds in {WAIT:?}: {banner:#?} {rounds:#?}"));
        if is_round_line(&line) {
            rounds.push(line);
        } else {
            assert!(rounds.is_empty(), "a line that is not a round's after the banner: {line:?}");
            banner.push(line);
        }
    }
    let banner = banner.join("\n");
    for part in ["mesh demo: 2 providers, 4 consumers", "Birdeye simulator", "node 0 provider"] {
        assert!(banner.contains(part), "banner lacks {part:?}:\n{banner}");
    }
    for part in ["curl   http://127.0.0.1:", "/api/mesh/prices", "Ctrl-C stops the demo"] {
        assert!(banner.contains(part), "banner lacks {part:?}:\n{banner}");
    }
    assert!(banner.contains("node<i>/logs/app.log"), "banner names the log files:\n{banner}");

    // Ctrl-C: one line saying it stopped cleanly, exit status 0.
    let pid = demo.0.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if !is_round_line(&line) {
            after.push(line);
        }
    }
    let status = demo.0.wait().unwrap();
    assert!(status.success(), "the demo exited with {status}; after Ctrl-C it printed {after:?}");
    assert_eq!(after.len(), 1, "one line after Ctrl-C: {after:?}");
    assert!(after[0].starts_with("Ctrl-C: stopped 6 nodes"), "{after:?}");
    assert!(after[0].contains("cleanly"), "{after:?}");

    // Nothing on stderr at the default level: the logs are in the files.
    let stderr = stderr.join().unwrap();
    assert!(stderr.is_empty(), "the demo wrote to stderr: {stderr:#?}");
    let log = |i: usize| {
        std::fs::read_to_string(dir.path().join(format!("node{i}/logs/app.log"))).unwrap()
    };
    let provider_logs = log(0) + &log(1);
    assert!(
        provider_logs.contains("Provider node broadcast complete"),
        "the providers' logs have their rounds"
    );
    let consumer = log(2);
    assert!(consumer.contains("node identity"), "node 2 logs into its own file");
    assert!(
        !consumer.contains("Provider node broadcast complete"),
        "a consumer's file holds only its own events"
    );
}
