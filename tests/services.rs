//! The machine's real PostgreSQL and Redis answer: proves that the test command started them.

use deadpool_redis::redis::AsyncCommands;
use mesh_tests::{TestDatabase, redis_url, unique_name};
use sqlx::Connection;

#[tokio::test]
async fn postgres_answers_in_a_database_of_our_own() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let (name, answer): (String, i32) =
        sqlx::query_as("SELECT current_database()::text, 40 + 2").fetch_one(&mut conn).await?;
    assert_eq!(name, db.name);
    assert_eq!(answer, 42);
    conn.close().await?;
    db.drop_db().await
}

#[tokio::test]
async fn redis_answers_and_keeps_a_value() -> anyhow::Result<()> {
    let pool = deadpool_redis::Config::from_url(redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    let mut conn = pool.get().await?;
    let key = unique_name("mesh_test");
    let _: () = conn.set_ex(&key, "present", 30).await?;
    let value: Option<String> = conn.get(&key).await?;
    assert_eq!(value.as_deref(), Some("present"));
    let removed: i64 = conn.del(&key).await?;
    assert_eq!(removed, 1);
    Ok(())
}
