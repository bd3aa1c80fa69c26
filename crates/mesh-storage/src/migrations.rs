//! The migrations of `migrations/` (PostgreSQL) and `migrations/sqlite/` (SQLite), embedded in
//! the binary at build time.
//!
//! sqlx's `migrate!` macro does the same, but it needs sqlx's `macros` feature, which builds
//! sqlx's PostgreSQL and SQLite drivers, and the SQLite C library, a second time for the
//! compiler (about 80 s of a 2-core machine's first build, for two files of SQL). The files
//! are listed here instead and resolved the way sqlx resolves a migrations folder
//! (`<version>_<description>.sql`, checksum of the contents), so a database migrated by an
//! earlier build, by `migrate!` or by `sqlx migrate run`, sees the same versions and
//! checksums; a test compares both with sqlx's own reading of the folders, and fails when a
//! file is added there but not here.

use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use crate::Result;

/// One migration file: its name and contents.
type File = (&'static str, &'static str);

/// Embeds `migrations/<dir><name>` for each name.
macro_rules! files {
    ($dir:literal: $($name:literal),+ $(,)?) => {
        &[$(($name, include_str!(concat!("../../../migrations/", $dir, $name)))),+]
    };
}

/// `migrations/`: the guide's tables on PostgreSQL.
const POSTGRES: &[File] = files!("":
    "20240101000001_create_mesh_price_cache.sql",
    "20240101000002_create_mesh_seen_messages.sql",
    "20240101000003_create_mesh_prices.sql",
);

/// `migrations/sqlite/`: their SQLite twins.
const SQLITE: &[File] = files!("sqlite/":
    "20240101000001_create_mesh_price_cache.sql",
    "20240101000002_create_mesh_seen_messages.sql",
    "20240101000003_create_mesh_prices.sql",
);

/// The PostgreSQL migrations (`migrations/`).
pub async fn postgres() -> Result<Migrator> {
    Ok(Migrator::new(Embedded(POSTGRES)).await?)
}

/// The SQLite migrations (`migrations/sqlite/`).
pub async fn sqlite() -> Result<Migrator> {
    Ok(Migrator::new(Embedded(SQLITE)).await?)
}

/// Embedded files as a [`MigrationSource`].
#[derive(Debug)]
struct Embedded(&'static [File]);

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<Vec<Migration>, BoxDynError>> + Send>>
    {
        let resolved = self.0.iter().map(|&(name, sql)| migration(name, sql)).collect();
        Box::pin(std::future::ready(resolved))
    }
}

/// The migration of file `name` holding `sql`, read as sqlx reads a migrations folder.
fn migration(name: &str, sql: &'static str) -> std::result::Result<Migration, BoxDynError> {
    let (version, rest) =
        name.split_once('_').ok_or_else(|| format!("migration {name:?}: no version prefix"))?;
    let version: i64 =
        version.parse().map_err(|_| format!("migration {name:?}: the version is not a number"))?;
    let migration_type = MigrationType::from_filename(rest);
    let description = rest.trim_end_matches(migration_type.suffix()).replace('_', " ");
    let no_tx = sql.starts_with("-- no-transaction");
    Ok(Migration::new(
        version,
        description.into(),
        migration_type,
        AssertSqlSafe(sql).into_sql_str(),
        no_tx,
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What sqlx reads from the folder: version, description, type, checksum, no-transaction.
    type Summary = Vec<(i64, String, String, Vec<u8>, bool)>;

    fn summary(migrator: &Migrator) -> Summary {
        migrator
            .iter()
            .map(|m| {
                let kind = m.migration_type.label().to_owned();
                (m.version, m.description.to_string(), kind, m.checksum.to_vec(), m.no_tx)
            })
            .collect()
    }

    #[tokio::test]
    async fn embedded_migrations_are_the_folders_as_sqlx_reads_them() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
        for (embedded, dir) in
            [(postgres().await, root.clone()), (sqlite().await, root.join("sqlite"))]
        {
            let from_folder = Migrator::new(dir.clone()).await.unwrap();
            assert_eq!(summary(&embedded.unwrap()), summary(&from_folder), "{}", dir.display());
        }
    }

    #[test]
    fn a_file_without_a_version_is_an_error() {
        assert!(migration("create_table.sql", "SELECT 1").is_err());
        assert!(migration("v1_create_table.sql", "SELECT 1").is_err());
    }
}
