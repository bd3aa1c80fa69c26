#!/bin/bash
# check_provider_health.sh
# The deployment guide's provider health check. Exit 0 when provider mode is on, else 1.
# MESH_API_URL overrides the API's address (default http://localhost:8080, as in the guide).

API="${MESH_API_URL:-http://localhost:8080}"
STATUS=$(curl -s "$API/api/mesh/provider/status")
ENABLED=$(echo "$STATUS" | jq -r '.data.enabled')

if [ "$ENABLED" = "true" ]; then
  echo "Provider is healthy"
  exit 0
else
  echo "Provider is not enabled"
  exit 1
fi
