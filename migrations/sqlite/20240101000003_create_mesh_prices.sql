-- SQLite twin of ../20240101000003_create_mesh_prices.sql: the latest price per (blockchain,
-- asset), which the guide's mesh_price_cache (keyed by asset alone) cannot hold for an address
-- on several chains. Times in Unix milliseconds, the node id as hyphenated UUID text.
CREATE TABLE IF NOT EXISTS mesh_prices (
    blockchain VARCHAR(50) NOT NULL,
    asset VARCHAR(255) NOT NULL,
    price VARCHAR(255) NOT NULL,
    timestamp INTEGER NOT NULL,
    source_node_id VARCHAR(36) NOT NULL,
    change_24h VARCHAR(50),
    created_at INTEGER DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at INTEGER DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    PRIMARY KEY (blockchain, asset)
);

CREATE INDEX IF NOT EXISTS idx_mesh_prices_timestamp
    ON mesh_prices(timestamp DESC);

INSERT INTO mesh_prices (blockchain, asset, price, timestamp, source_node_id, change_24h)
SELECT blockchain, asset, price, timestamp, source_node_id, change_24h FROM mesh_price_cache
WHERE true
ON CONFLICT (blockchain, asset) DO NOTHING;
