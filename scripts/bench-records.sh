#!/usr/bin/env bash
# Recordings: nginx (Debian's, sendfile on, started here on loopback) and `pbxgate serve` (the
# release binary, its own process, started by benches/records.rs) serve the same 50 MiB file to
# CONNECTIONS (default 50) concurrent wrk clients for DURATION (default 10) seconds each, taking
# RUNS (default 2) turns each, pbxgate first. Prints every run, the throughput and RSS ratios and
# both servers' own RSS before, at the peak and after.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have wrk || ! have curl; then
  apt-get install -y nginx-light wrk curl >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y nginx-light wrk curl >/dev/null; }
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

work=$(mktemp -d)
nginx_pid=""
cleanup() {
  if [ -n "$nginx_pid" ]; then
    kill "$nginx_pid" 2>/dev/null || true
    wait "$nginx_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${PBXGATE_BIN:-}" ]; then
  scripts/release-bin.sh "$work"
  export PBXGATE_BIN="$work/pbxgate"
fi

# nginx's workers run as nobody: the file must be readable by anyone.
mkdir -p "$work/monitor" "$work/nginx"
chmod 755 "$work" "$work/monitor"
file="$work/monitor/rec.wav"
# A PCM WAV header for 52,428,756 data bytes (50 MiB in all), then random bytes.
printf 'RIFF\xf8\xff\x1f\x03WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80\x3e\x00\x00\x02\x00\x10\x00data\xd4\xff\x1f\x03' >"$file"
head -c $((50 * 1024 * 1024 - 44)) /dev/urandom >>"$file"
chmod 644 "$file"

port=""
for _ in $(seq 1 50); do
  candidate=$((20000 + RANDOM % 30000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
    port=$candidate
    break
  fi
done
[ -n "$port" ] || { echo "no free port found" >&2; exit 1; }

cat >"$work/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  types { audio/wav wav; }
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$port;
    root $work/monitor;
  }
}
EOF
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' &
nginx_pid=$!
for _ in $(seq 1 100); do
  curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$port/rec.wav" && break
  sleep 0.1
done
curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$port/rec.wav" || { cat "$work/nginx/error.log" >&2; exit 1; }

RECORDS_DIR="$work/monitor" BENCH_FILE=rec.wav \
  NGINX_URL="http://127.0.0.1:$port/rec.wav" NGINX_PID="$nginx_pid" \
  cargo bench --bench records --locked
