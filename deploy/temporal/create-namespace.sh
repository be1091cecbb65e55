#!/bin/sh
# The gateway's namespace (TEMPORAL_NAMESPACE), once the frontend serves. The worker registers the gateway's
# search attributes in it itself when it starts (app/temporal_client.py).
set -eu
# By its IPv4 address: the CLI may otherwise try an address of the name that the frontend does not listen on.
address="$(getent ahosts temporal | awk '/STREAM/ { print $1; exit }'):7233"
attempt=0
until temporal operator cluster health --address "$address"; do
  attempt=$((attempt + 1))
  [ "$attempt" -lt 30 ] || { echo "Temporal at $address did not become healthy" >&2; exit 1; }
  sleep 2
done
temporal operator namespace describe --address "$address" --namespace "$NAMESPACE" >/dev/null 2>&1 \
  || temporal operator namespace create --address "$address" --namespace "$NAMESPACE" --retention "$RETENTION"
