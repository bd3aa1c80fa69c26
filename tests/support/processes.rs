//! Servers a test starts, breaks and restarts itself, so that it never touches the machine's
//! own PostgreSQL (5432) or Redis (6379): a `redis-server` child process and a throwaway
//! PostgreSQL cluster, both on spare loopback ports.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::eventually;

/// A TCP port nobody listens on right now (loopback).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` of the test's own (no persistence), killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Serves TLS only (`rediss://`) with this certificate; clients trust `ca`.
    tls: Option<RedisTls>,
}

#[derive(Debug, Clone)]
struct RedisTls {
    server: crate::tls::ServerFiles,
    ca: PathBuf,
}

impl RedisServer {
    /// Starts one on a spare port, with `password` required when given, and waits until it
    /// answers.
    pub async fn start(password: Option<&str>) -> anyhow::Result<Self> {
        let mut server = Self {
            port: free_port()?,
            password: password.map(str::to_owned),
            dir: tempfile::tempdir()?,
            child: None,
            tls: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// Starts one that speaks TLS only (`rediss://`), with `server`'s certificate, and
    /// `password` required when given; waits until it answers a client that trusts `ca`.
    pub async fn start_tls(
        password: Option<&str>,
        server: &crate::tls::ServerFiles,
        ca: &Path,
    ) -> anyhow::Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            password: password.map(str::to_owned),
            dir: tempfile::tempdir()?,
            child: None,
            tls: Some(RedisTls { server: server.clone(), ca: ca.to_path_buf() }),
        };
        redis.spawn().await?;
        Ok(redis)
    }

    /// Its URL (with the password; `rediss://` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Kills it (SIGKILL: no goodbye to its clients) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(tls) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.server.cert)
                .arg("--tls-key-file")
                .arg(&tls.server.key)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().context("starting redis-server (is Redis installed?)")?);
        let client = match &self.tls {
            None => deadpool_redis::redis::Client::open(self.url())?,
            Some(tls) => {
                mesh_storage::tls::install_crypto_provider();
                let certificates = deadpool_redis::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(&tls.ca)?),
                };
                deadpool_redis::redis::Client::build_with_tls(self.url(), certificates)?
            }
        };
        eventually(
            "the test's redis-server answers",
            Duration::from_secs(15),
            async || match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => deadpool_redis::redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
        )
        .await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL cluster of the test's own (trust authentication, user `postgres`) in a
/// temporary directory, stopped and removed when dropped. As root, its commands run as the
/// `postgres` user (`runuser`), since PostgreSQL refuses to run as root.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `ssl=on`, with `server.crt` and `server.key` in the data directory.
    ssl: bool,
}

impl PgCluster {
    /// Creates (initdb) and starts a cluster on a spare port.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // The postgres user creates the data directory, socket and log in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let cluster = Self { bin: postgres_bin_dir()?, port: free_port()?, dir, ssl: false };
        cluster.init()?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// Like [`PgCluster::start`], with TLS on (`ssl=on`) and `server`'s certificate and key;
    /// clients may still connect without TLS (`sslmode=disable`), as PostgreSQL allows.
    pub async fn start_tls(server: &crate::tls::ServerFiles) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let cluster = Self { bin: postgres_bin_dir()?, port: free_port()?, dir, ssl: true };
        cluster.init()?;
        // PostgreSQL reads them as its own user, and wants the key private.
        let data = cluster.data_dir();
        let owner = std::fs::metadata(&data)?;
        for (from, name, mode) in
            [(&server.cert, "server.crt", 0o644), (&server.key, "server.key", 0o600)]
        {
            let to = data.join(name);
            std::fs::copy(from, &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
            std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid()))?;
        }
        cluster.start_again()?;
        Ok(cluster)
    }

    fn init(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            "initdb",
            &["-D", path_str(&data)?, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )
    }

    /// URL of database `db` in the cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): connections are cut, new ones
    /// refused.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", path_str(&self.data_dir())?, "-m", "immediate", "-w", "stop"])
    }

    /// Starts the server (again) on the same port and waits until it accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            path_str(self.dir.path())?,
            if self.ssl { " -c ssl=on" } else { "" }
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir())?,
                "-l",
                path_str(&log)?,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program);
        let mut cmd = if running_as_root()? {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {args:?} failed ({}): {}{}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Where `initdb` and `pg_ctl` are: `MESH_TEST_PG_BIN`, the newest
/// `/usr/lib/postgresql/*/bin` (Debian), or `pg_config --bindir`.
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("MESH_TEST_PG_BIN") {
        return Ok(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().context("finding initdb")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

fn running_as_root() -> anyhow::Result<bool> {
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Deletes every key under `prefix` from the Redis at `url` (cleanup after a test).
pub async fn delete_redis_prefix(url: &str, prefix: &str) -> anyhow::Result<u64> {
    let client = deadpool_redis::redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut deleted = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = deadpool_redis::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            deleted +=
                deadpool_redis::redis::cmd("DEL").arg(&keys).query_async::<u64>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// The `mesh-node` binary: `MESH_NODE_BIN`, or the one cargo built next to this test
/// (`cargo test --workspace`, the README's test command, builds it for its own tests).
pub fn mesh_node_bin() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("MESH_NODE_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("mesh-node"))
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p mesh-node` (or the whole workspace's tests), or set \
         MESH_NODE_BIN",
        bin.display()
    );
    Ok(bin)
}
