//! Keeps idle CPUs from halting while a latency is measured (`--keep-cpus-awake`).
//!
//! In a virtual machine, a CPU that has nothing to run halts, and the hypervisor gives its host
//! core to somebody else; waking it again (a message arrives for a relay whose thread slept)
//! costs a round through the hypervisor. A hundred relays in one process wake and sleep many
//! times per message, so at a low publish rate these wake-ups add up to a good part of the
//! publish-to-last-node latency, although none of it is relay work. The relay benchmark's
//! `--keep-cpus-awake` measures without them.
//!
//! The keeper is a child process (`mesh-bench awake`, hidden) with one thread per CPU, each in
//! the `SCHED_IDLE` class, spinning. The kernel runs a `SCHED_IDLE` thread only when no other
//! thread wants the CPU, and preempts it as soon as one does, so the benchmark's threads get
//! the same CPU time as without it; only the halts are gone. Being another process, its CPU
//! time is not counted in the benchmark's own (`/proc/self/stat`). It dies with the benchmark
//! (`PR_SET_PDEATHSIG`), also when the benchmark is killed.

use std::process::{Child, Command, Stdio};

/// Options of the hidden `awake` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Spinning threads (one per CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Process id of the benchmark: the keeper ends with it.
    #[arg(long)]
    pub parent: u32,
}

/// A running keeper; stopped when dropped.
#[derive(Debug)]
pub struct Awake {
    child: Child,
    threads: usize,
}

impl Awake {
    /// Starts a keeper with `threads` spinning threads (one per CPU). Call it from the main
    /// thread: the keeper dies when the thread that started it ends.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .args(["awake", "--threads", &threads.to_string()])
            .args(["--parent", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self { child, threads })
    }

    /// Spinning threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The keeper's body: never returns while its parent lives.
pub fn run(args: &Args) -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| anyhow::anyhow!("prctl(PR_SET_PDEATHSIG): {e}"))?;
    // The parent may have gone before the signal was armed.
    if std::os::unix::process::parent_id() != args.parent {
        return Ok(());
    }
    let spinners: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            std::thread::spawn(|| -> std::io::Result<()> {
                lowest_priority()?;
                loop {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for spinner in spinners {
        match spinner.join() {
            Ok(result) => {
                result.map_err(|e| anyhow::anyhow!("sched_setscheduler(SCHED_IDLE): {e}"))?
            }
            Err(_) => anyhow::bail!("a spinning thread panicked"),
        }
    }
    Ok(())
}

/// Moves the calling thread to the `SCHED_IDLE` class (nix has no wrapper for it).
#[allow(unsafe_code)]
fn lowest_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread, and `param` outlives the call, which only reads it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
