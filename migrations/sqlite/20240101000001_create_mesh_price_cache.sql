-- SQLite twin of ../20240101000001_create_mesh_price_cache.sql (the embedded default store).
-- Same table, columns and indexes. SQLite has no timestamp or UUID type, so:
--   * times are INTEGER Unix milliseconds (numeric comparison in the newest-wins upsert; text
--     times in RFC 3339 have variable-length fractions and do not sort);
--   * UUIDs are their hyphenated text.
CREATE TABLE IF NOT EXISTS mesh_price_cache (
    asset VARCHAR(255) PRIMARY KEY NOT NULL,
    price VARCHAR(255) NOT NULL,
    blockchain VARCHAR(50) NOT NULL,
    timestamp INTEGER NOT NULL,
    source_node_id VARCHAR(36) NOT NULL,
    change_24h VARCHAR(50),
    created_at INTEGER DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at INTEGER DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE INDEX IF NOT EXISTS idx_mesh_price_cache_timestamp
    ON mesh_price_cache(timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_mesh_price_cache_blockchain
    ON mesh_price_cache(blockchain);
