-- Migration: Create mesh_prices table (ours, not the guide's)
-- The latest price per (blockchain, asset). The guide's mesh_price_cache keeps its DDL (asset
-- alone is its primary key, and operators' queries rely on it), so for an address that exists
-- on several chains it holds the newest of them; this table keeps each chain's, and it is what
-- a node reloads at start. Both are written by the same statement batch.
CREATE TABLE IF NOT EXISTS mesh_prices (
    blockchain VARCHAR(50) NOT NULL,
    asset VARCHAR(255) NOT NULL,
    price VARCHAR(255) NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL,
    source_node_id UUID NOT NULL,
    change_24h VARCHAR(50),
    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    PRIMARY KEY (blockchain, asset)
);

CREATE INDEX IF NOT EXISTS idx_mesh_prices_timestamp
    ON mesh_prices(timestamp DESC);

-- A node upgraded from a version that kept only mesh_price_cache reloads what it had.
INSERT INTO mesh_prices (blockchain, asset, price, timestamp, source_node_id, change_24h)
SELECT blockchain, asset, price, timestamp, source_node_id, change_24h FROM mesh_price_cache
ON CONFLICT (blockchain, asset) DO NOTHING;
