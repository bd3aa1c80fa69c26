-- SQLite twin of ../20240101000002_create_mesh_seen_messages.sql (times in Unix milliseconds,
-- the id as hyphenated UUID text; see the price cache migration).
CREATE TABLE IF NOT EXISTS mesh_seen_messages (
    message_id VARCHAR(36) PRIMARY KEY NOT NULL,
    seen_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_mesh_seen_messages_expires
    ON mesh_seen_messages(expires_at);
