#!/bin/bash
# check_network_health.sh
# The deployment guide's network health check. Exit 0 with at least one active provider and
# three connected peers, else 1.
# MESH_API_URL overrides the API's address (default http://localhost:8080, as in the guide).

API="${MESH_API_URL:-http://localhost:8080}"
STATUS=$(curl -s "$API/api/mesh/network/status")
PROVIDERS=$(echo "$STATUS" | jq -r '.data.active_providers | length')
PEERS=$(echo "$STATUS" | jq -r '.data.connected_peers')

if [ "$PROVIDERS" -gt 0 ] && [ "$PEERS" -ge 3 ]; then
  echo "Network is healthy"
  exit 0
else
  echo "Network health issue: providers=$PROVIDERS, peers=$PEERS"
  exit 1
fi
