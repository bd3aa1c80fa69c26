//! Private network namespaces, for tests that must not send anything on a real interface.
//!
//! mdns-sd joins its multicast groups on every interface that is up when its daemon starts
//! (before an interface selection can apply), and the kernel announces each join with an
//! IGMP/MLD report on that interface. A test that runs mDNS in a namespace of its own, whose
//! only interfaces are its loopback and what the test creates there, cannot reach the
//! machine's real interfaces at all.

use std::future::Future;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use nix::sched::{CloneFlags, unshare};

/// Runs `ip` with `args` in the calling thread's network namespace and returns its output.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2) to set up the test's network namespace")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the interfaces of the calling thread's network namespace.
pub fn interfaces() -> anyhow::Result<Vec<String>> {
    // Lines look like "1: lo: <LOOPBACK,UP,LOWER_UP> mtu ..." or "3: v0@v1: <...".
    Ok(ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect())
}

/// Runs `test` on a thread of its own inside a new network namespace whose only interface is
/// its loopback (brought up here), on a tokio runtime built inside it: every socket the test
/// opens and every thread it starts (runtime workers, the mdns-sd daemon) live in that
/// namespace. A panic of the test is passed on as a panic.
///
/// Needs CAP_SYS_ADMIN (root, as the test machines and CI run) and the `ip` command.
pub fn in_private_netns<F, Fut, T>(test: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let thread = std::thread::Builder::new().name("private-netns".into()).spawn(move || {
        // Namespaces belong to threads: only this thread, and the threads and processes it
        // starts from now on, are in the new one.
        unshare(CloneFlags::CLONE_NEWNET).context(
            "unshare(CLONE_NEWNET): the mDNS tests run in a private network namespace and need \
             root (CAP_SYS_ADMIN)",
        )?;
        ip(&["link", "set", "lo", "up"])?;
        let found = interfaces()?;
        if found != ["lo"] {
            bail!("the private network namespace should hold only lo, it holds {found:?}");
        }
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(test())
    })?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
