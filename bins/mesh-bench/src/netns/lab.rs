//! The benchmark's private network: network namespaces joined by links that add delay and
//! loss, and the processes started inside them. Everything is named with [`PREFIX`], and
//! everything is removed when the [`Lab`] is dropped (also on an error or a panic); a run
//! that was killed is cleaned by [`cleanup`] (`mesh-bench netns --cleanup`).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tun;
use crate::memory::ChildGuard;

/// Prefix of every namespace this benchmark creates.
pub const PREFIX: &str = "meshbench-";

/// How a link delays and drops packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// A veth pair with `tc qdisc add dev <veth> root netem` on both ends (needs the kernel's
    /// `sch_netem`).
    Netem,
    /// A pair of TUN devices joined by this process, which delays and drops (any kernel with
    /// TUN).
    Tun,
    /// `netem` when the kernel has it, else `tun`.
    Auto,
}

/// Runs a command to completion; an error carries its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Namespaces, links and processes of one run.
pub struct Lab {
    /// Namespace names, in node order.
    pub namespaces: Vec<String>,
    children: Vec<ChildGuard>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Counters of the emulated (TUN) links.
    pub link_stats: Arc<tun::LinkStats>,
    /// Link commands run, for the report.
    pub commands: Vec<String>,
}

impl Lab {
    /// Creates `n` namespaces (loopback up in each), named `meshbench-<pid>-<i>`.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        let mut lab = Self {
            namespaces: Vec::new(),
            children: Vec::new(),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            link_stats: Arc::default(),
            commands: Vec::new(),
        };
        let id = std::process::id();
        for i in 0..n {
            let name = format!("{PREFIX}{id}-{i}");
            sh("ip", &["netns", "add", &name])?;
            lab.namespaces.push(name.clone());
            sh("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Whether `tc ... netem` works here: tried on a throwaway veth pair inside the first
    /// namespace.
    pub fn netem_available(&self) -> anyhow::Result<bool> {
        let ns = &self.namespaces[0];
        sh(
            "ip",
            &["-n", ns, "link", "add", "mbprobe0", "type", "veth", "peer", "name", "mbprobe1"],
        )?;
        let ok = sh(
            "tc",
            &["-n", ns, "qdisc", "add", "dev", "mbprobe0", "root", "netem", "delay", "1ms"],
        )
        .is_ok();
        sh("ip", &["-n", ns, "link", "del", "mbprobe0"])?;
        Ok(ok)
    }

    /// Sets TCP congestion control in every namespace when `name` is given; returns the one in
    /// effect (read in the first namespace).
    pub fn congestion_control(&self, name: Option<&str>) -> anyhow::Result<String> {
        const KNOB: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
        if let Some(name) = name {
            anyhow::ensure!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "bad congestion control name {name:?}"
            );
            for ns in &self.namespaces {
                // /proc/sys/net shows the namespace of the process that reads or writes it.
                sh("ip", &["netns", "exec", ns, "sh", "-c", &format!("echo {name} > {KNOB}")])?;
            }
        }
        Ok(sh("ip", &["netns", "exec", &self.namespaces[0], "cat", KNOB])?.trim().to_owned())
    }

    /// Joins namespaces `a` and `b` with link number `k` (interface `mbl<k>` on both sides,
    /// addresses `10.77.<k / 64>.<4 (k % 64) + 1>/30` on `a` and `... + 2` on `b`); returns
    /// both addresses.
    pub fn link(
        &mut self,
        kind: LinkKind,
        k: usize,
        (a, b): (usize, usize),
        delay: Duration,
        loss_percent: f64,
    ) -> anyhow::Result<(String, String)> {
        anyhow::ensure!(k < 64 * 256, "too many links");
        let (na, nb) = (self.namespaces[a].clone(), self.namespaces[b].clone());
        let ifname = format!("mbl{k}");
        let addr = |host: usize| format!("10.77.{}.{}", k / 64, 4 * (k % 64) + host);
        let (addr_a, addr_b) = (addr(1), addr(2));
        match kind {
            LinkKind::Netem | LinkKind::Auto => {
                let args = [
                    "link", "add", &ifname, "netns", &na, "type", "veth", "peer", "name", &ifname,
                    "netns", &nb,
                ];
                sh("ip", &args)?;
                self.commands.push(format!("ip {}", args.join(" ")));
            }
            LinkKind::Tun => {
                let fa = tun::open_in(&format!("/run/netns/{na}"), &ifname)?;
                let fb = tun::open_in(&format!("/run/netns/{nb}"), &ifname)?;
                tun::emulate(
                    fa,
                    fb,
                    delay,
                    loss_percent / 100.0,
                    &self.link_stats,
                    &self.tracker,
                    &self.cancel,
                )?;
            }
        }
        for (ns, address) in [(&na, &addr_a), (&nb, &addr_b)] {
            let cidr = format!("{address}/30");
            sh("ip", &["-n", ns, "addr", "add", &cidr, "dev", &ifname])?;
            sh("ip", &["-n", ns, "link", "set", &ifname, "up"])?;
            if kind != LinkKind::Tun {
                let delay_arg = format!("{}ms", delay.as_millis());
                let loss_arg = format!("{loss_percent}%");
                let args = [
                    "-n", ns, "qdisc", "add", "dev", &ifname, "root", "netem", "delay", &delay_arg,
                    "loss", &loss_arg,
                ];
                sh("tc", &args)?;
                self.commands.push(format!("tc {}", args.join(" ")));
            }
        }
        Ok((addr_a, addr_b))
    }

    /// Starts `program` inside namespace `i` (`ip netns exec`, which execs the program: the
    /// child's PID is the program's); killed when the lab is dropped.
    pub fn spawn(&mut self, i: usize, command: Command) -> anyhow::Result<u32> {
        let program = command.get_program().to_owned();
        let mut wrapped = Command::new("ip");
        wrapped.arg("netns").arg("exec").arg(&self.namespaces[i]).arg(program);
        wrapped.args(command.get_args());
        wrapped.env_clear();
        for (k, v) in command.get_envs() {
            if let Some(v) = v {
                wrapped.env(k, v);
            }
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let log = command
            .get_current_dir()
            .map(|d| d.join("stdout.log"))
            .ok_or_else(|| anyhow::anyhow!("spawn needs a current directory for the log"))?;
        let file = std::fs::File::create(&log)?;
        wrapped.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = wrapped.spawn()?;
        let pid = child.id();
        self.children.push(ChildGuard(child));
        Ok(pid)
    }

    /// Stops the processes and the links and deletes the namespaces.
    pub async fn shutdown(mut self) {
        self.children.clear();
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        // Drop deletes the namespaces.
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (a namespace goes away only when nothing runs in it), then the
        // links' tasks, then the namespaces, which takes their interfaces with them.
        self.children.clear();
        self.cancel.cancel();
        for ns in &self.namespaces {
            kill_inside(ns);
            if let Err(e) = sh("ip", &["netns", "del", ns]) {
                eprintln!("mesh-bench netns: could not delete namespace {ns}: {e}");
            }
        }
    }
}

/// Kills (by PID) every process still running inside namespace `ns`.
fn kill_inside(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter(|p| p.chars().all(|c| c.is_ascii_digit())) {
            let _ = sh("kill", &["-KILL", pid]);
        }
    }
}

/// Removes whatever a killed run left: the processes in and the namespaces named
/// [`PREFIX`]`*`. Returns the namespaces removed.
pub fn cleanup() -> anyhow::Result<Vec<String>> {
    let list = sh("ip", &["netns", "list"])?;
    let mut removed = Vec::new();
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with(PREFIX) {
            kill_inside(ns);
            // The kernel frees a namespace's processes asynchronously; retry a little.
            let mut result = sh("ip", &["netns", "del", ns]);
            for _ in 0..10 {
                if result.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                result = sh("ip", &["netns", "del", ns]);
            }
            result?;
            removed.push(ns.to_owned());
        }
    }
    Ok(removed)
}
