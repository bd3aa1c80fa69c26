#!/bin/bash
# mesh-seen-cleanup.sh
# The deployment guide's daily database maintenance: deletes the seen message ids that expired
# more than a day ago. Runs against DATABASE_URL (as mesh-node does); with DATABASE_URL unset
# the node keeps its ids in SQLite and cleans them up itself (every hour), so there is nothing
# to do. Started daily by mesh-seen-cleanup.timer; prints the number of rows deleted.
set -euo pipefail

if [ -z "${DATABASE_URL:-}" ]; then
  echo "DATABASE_URL is not set: the node's SQLite store is cleaned up by the node itself"
  exit 0
fi

exec psql "$DATABASE_URL" --no-psqlrc --quiet --set ON_ERROR_STOP=1 --tuples-only --no-align \
  --command "WITH gone AS (
               DELETE FROM mesh_seen_messages
               WHERE expires_at < NOW() - INTERVAL '1 day'
               RETURNING 1)
             SELECT 'expired seen message ids deleted: ' || count(*) FROM gone;"
