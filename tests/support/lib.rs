//! Helpers shared by the workspace's integration tests: where the real services are and how a
//! test gets a database and a Redis key prefix of its own, so tests run in parallel and leave
//! nothing behind.
//!
//! The services are the machine's PostgreSQL and Redis (`scripts/test` starts or installs them).
//! `MESH_TEST_DATABASE_URL` (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`) must name a
//! role that may create databases; `MESH_TEST_REDIS_URL` defaults to `redis://127.0.0.1:6379`.

pub mod api;
pub mod cdp;
mod eventually;
mod logs;
pub mod netns;
mod processes;
pub mod reliability;
pub mod tls;

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

pub use eventually::eventually;
pub use logs::LogCapture;
pub use processes::{PgCluster, RedisServer, delete_redis_prefix, free_port, mesh_node_bin};

/// `/ip4/127.0.0.1/tcp/<port>/p2p/<peer>` of a relay listening on 127.0.0.1 over TCP.
pub async fn tcp_addr(relay: &mesh_relay::Relay) -> anyhow::Result<mesh_relay::Multiaddr> {
    let addr = relay
        .listen_addrs()
        .await?
        .into_iter()
        .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"))
        .ok_or_else(|| anyhow::anyhow!("no TCP address"))?;
    Ok(addr.with(mesh_relay::Protocol::P2p(relay.peer_id())))
}

/// Admin URL of the test PostgreSQL server.
pub fn database_admin_url() -> String {
    std::env::var("MESH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

/// URL of the test Redis server.
pub fn redis_url() -> String {
    std::env::var("MESH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A name no other test uses: `prefix` plus a random suffix.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A database created for one test and dropped at the end of the test with
/// [`TestDatabase::drop_db`], because dropping a database needs an async connection.
pub struct TestDatabase {
    /// Its name.
    pub name: String,
    /// URL that connects to it.
    pub url: String,
}

impl TestDatabase {
    /// Creates an empty database with a unique name.
    pub async fn create() -> anyhow::Result<Self> {
        let admin = database_admin_url();
        let name = unique_name("mesh_test");
        let mut conn = PgConnection::connect(&admin).await?;
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
        conn.close().await?;
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => anyhow::bail!("MESH_TEST_DATABASE_URL {admin} has no database part"),
        };
        Ok(Self { name, url })
    }

    /// Drops the database (closing any connection still open to it).
    pub async fn drop_db(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&database_admin_url()).await?;
        conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .await?;
        conn.close().await?;
        Ok(())
    }
}
