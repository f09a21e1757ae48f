#!/usr/bin/env bash
# Runs the README's curl tour, exactly as written, against a fresh server on a loopback port.
# Usage: scripts/readme-tour.sh [path/to/trellis]   (default: target/debug/trellis)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/trellis}
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
export TOKEN="tour-$(date +%s)-$RANDOM"
TRELLIS_ADMIN_TOKEN=$TOKEN "$bin" serve --database-url "sqlite://$work/tour.db" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
# The tour block, with the documented address replaced by this server's.
sed -n '/<!-- tour:begin -->/,/<!-- tour:end -->/p' README.md | sed '1,2d;$d' | sed '$d' \
  | sed "s#127.0.0.1:8080#127.0.0.1:$port#" >"$work/tour.sh"
echo "Running the README tour against 127.0.0.1:$port"
bash -euo pipefail "$work/tour.sh"
echo "README tour: OK"
