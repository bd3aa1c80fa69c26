//! A userspace link emulator for kernels without `sch_netem`: each link is a pair of TUN
//! devices, one in each namespace, and this process carries every packet from one to the
//! other after a fixed delay, dropping a share of them at random (what `tc qdisc ... netem
//! delay D loss L%` does on a veth pair). Packets keep their order (one delay for all).
//!
//! Most of the benchmarks' unsafe code is here (the rest is one `sched_setscheduler` call in
//! `awake`): the `TUNSETIFF` ioctl that attaches the open `/dev/net/tun` file to a named
//! device, and handing that file to Tokio's reactor.
#![allow(unsafe_code)] // the TUNSETIFF ioctl (`attach`) and the reactor registration (`register`)

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Packets held by one direction of a link at most (beyond: dropped and counted).
const QUEUE: usize = 8192;

/// Counters of every emulated link together.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Packets carried.
    pub forwarded: AtomicU64,
    /// Packets dropped on purpose (the loss rate).
    pub lost: AtomicU64,
    /// Packets dropped because a direction's queue was full.
    pub overflow: AtomicU64,
}

/// Opens a TUN device named `name` (no packet-information header) inside the network
/// namespace mounted at `netns_path`. The device lives as long as the returned file.
pub fn open_in(netns_path: &str, name: &str) -> anyhow::Result<File> {
    let path = netns_path.to_owned();
    let name = name.to_owned();
    // setns changes the calling thread's namespace only: do it on a thread of our own, which
    // ends right after. The device belongs to the namespace the file was opened in.
    std::thread::spawn(move || -> anyhow::Result<File> {
        let ns = File::open(&path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("setns into {path}: {e}"))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        attach(&file, &name)?;
        Ok(file)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TUN thread panicked"))?
}

/// `TUNSETIFF`: makes `file` the queue of the TUN device `name` (created if missing).
fn attach(file: &File, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && name.len() < libc::IFNAMSIZ && name.is_ascii(),
        "bad interface name {name:?}"
    );
    // SAFETY: `ifreq` is plain data (a name array and a union of plain fields); all zeroes is
    // a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and TUNSETIFF reads
    // (and may write back) exactly one `ifreq`, which `request` is, alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(anyhow::anyhow!("TUNSETIFF {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Carries packets both ways between two TUN devices until `cancel`.
pub fn emulate(
    a: File,
    b: File,
    delay: Duration,
    loss: f64,
    stats: &Arc<LinkStats>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let a = Arc::new(register(a)?);
    let b = Arc::new(register(b)?);
    for (from, to) in [(a.clone(), b.clone()), (b, a)] {
        let (tx, rx) = mpsc::channel(QUEUE);
        tracker.spawn(read_side(from, tx, delay, loss, stats.clone(), cancel.clone()));
        tracker.spawn(write_side(to, rx, stats.clone(), cancel.clone()));
    }
    Ok(())
}

/// Puts a TUN file under the runtime's reactor.
fn register(file: File) -> anyhow::Result<AsyncFd<File>> {
    // SAFETY: the `File` owns its descriptor and moves into the `AsyncFd`, which owns it until
    // it is dropped; a `File`'s `as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register(file) }.map_err(|e| anyhow::anyhow!("registering a TUN device: {e}"))
}

/// Reads packets, drops the lost ones, and stamps the others with their delivery time.
async fn read_side(
    from: Arc<AsyncFd<File>>,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    delay: Duration,
    loss: f64,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return,
            g = from.readable() => match g {
                Ok(g) => g,
                Err(_) => return,
            },
        };
        let n = match guard.try_io(|f| f.get_ref().read(&mut buf)) {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        if rand::random::<f64>() < loss {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if tx.try_send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes each packet into the other device once its time has come.
async fn write_side(
    to: Arc<AsyncFd<File>>,
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
) {
    loop {
        let (at, packet) = tokio::select! {
            () = cancel.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(at) => {}
        }
        // Bounded: a device that stays unwritable for a second loses the packet.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut guard = tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    stats.overflow.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                g = to.writable() => match g {
                    Ok(g) => g,
                    Err(_) => return,
                },
            };
            match guard.try_io(|f| f.get_ref().write(&packet)) {
                Ok(Ok(_)) => {
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // The kernel refused this packet (device down, ...): it is lost.
                Ok(Err(_)) => break,
                Err(_would_block) => {}
            }
        }
    }
}
