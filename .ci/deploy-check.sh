#!/usr/bin/env bash
# CI: check what docker/ ships for deployment.
#
# usage: .ci/deploy-check.sh
#
#   1. build capsule's own image (docker/capsule/Dockerfile) on the local base
#   2. run it against the engine through the mounted socket (an instance name
#      of its own, a port on loopback): /health answers 200, one session over
#      the WebSocket runs `echo ok`, and `docker stop` ends it with status 0
#   3. systemd-analyze verify docker/capsule.service (where systemd-analyze is)
#   4. nginx -t on docker/nginx/capsule.conf (nginx installed with apt if
#      missing; never started)
#
# Everything it starts or tags is removed on exit, whether it passed or not;
# the image's layers stay in the build cache for the next run.
#
# environment:
#   CAPSULE_BASE   base of capsule's image (default capsule-base:bookworm, else
#                  debian:bookworm-slim if that is here)
#   CAPSULE_IMAGE  the session image (default capsule-runtime:latest)
set -euo pipefail
cd "$(dirname "$0")/.."

run_id="deploy-check-$$"
tag="capsule:$run_id"
container="capsule-$run_id"
instance="$run_id"
session_image="${CAPSULE_IMAGE:-capsule-runtime:latest}"
work="$(mktemp -d "${TMPDIR:-/tmp}/capsule-deploy-check.XXXXXX")"
ca_copy=""
failed=0
summary=()

say() { printf 'deploy-check: %s\n' "$*" >&2; }

cleanup() {
  local rc=$?
  docker rm -f -v "$container" >/dev/null 2>&1 || true
  # sessions survive capsule by design: remove those of this instance
  local left
  left="$(docker ps -aq --filter "label=io.capsule.instance=$instance" 2>/dev/null || true)"
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    docker rm -f -v $left >/dev/null 2>&1 || true
  fi
  docker rmi --no-prune "$tag" >/dev/null 2>&1 || true
  if [ -n "$ca_copy" ]; then rm -f "$ca_copy"; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step NAME COMMAND...: run one step, time it, note the result
step() {
  local name="$1"; shift
  local t0=$SECONDS rc=0
  say "== $name"
  "$@" || rc=$?
  local t=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then summary+=("ok    ${t}s  $name")
  elif [ "$rc" = 77 ]; then summary+=("skip  ${t}s  $name")
  else summary+=("FAIL  ${t}s  $name"); failed=1
  fi
  return 0
}

# --- 1. the image -----------------------------------------------------------
build_image() {
  local base="${CAPSULE_BASE:-}"
  if [ -z "$base" ]; then
    if docker image inspect capsule-base:bookworm >/dev/null 2>&1; then base=capsule-base:bookworm
    elif docker image inspect debian:bookworm-slim >/dev/null 2>&1; then base=debian:bookworm-slim
    else say "no base image: run docker/build-image.sh first (it makes capsule-base:bookworm)"; return 1
    fi
  fi
  if [ ! -f www/node_modules/.installed ]; then
    say "www/node_modules is not installed: the build runs npm ci itself"
  fi
  # Behind a proxy that intercepts TLS, the build's pip must trust what the
  # host trusts.
  local ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
  if [ -n "$ca" ] && [ -f "$ca" ] && ! ls docker/capsule/*.crt >/dev/null 2>&1; then
    ca_copy="docker/capsule/deploy-check.crt"  # one name: the build cache holds
    cp "$ca" "$ca_copy"
  fi
  # not BuildKit where the client has no buildx (as docker/build-image.sh)
  if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
  fi
  say "building $tag from $base (log: $work/build.log)"
  if ! docker build --build-arg "BASE=$base" -f docker/capsule/Dockerfile -t "$tag" . >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    return 1
  fi
  if [ -n "$ca_copy" ]; then rm -f "$ca_copy"; ca_copy=""; fi
  say "built $tag ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec-i --suffix=B))"
}

# --- 2. a run against the engine ---------------------------------------------
port=""
start_container() {
  docker image inspect "$session_image" >/dev/null 2>&1 \
    || { say "no session image $session_image: make image"; return 1; }
  port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local gid
  gid="$(stat -c %g /var/run/docker.sock)"
  # As docker/compose.yaml runs it (read-only, no capabilities), without TLS
  # and users: the port is on loopback.
  docker run -d --name "$container" \
    -v /var/run/docker.sock:/var/run/docker.sock --group-add "$gid" \
    -p "127.0.0.1:$port:3001" \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges:true \
    "$tag" \
    --listen tcp:3001 --insecure-no-auth --public-url "http://127.0.0.1:$port" \
    --instance "$instance" --image "$session_image" --pool-size 0 >/dev/null
  [ "$(docker inspect --format '{{.Config.User}}' "$container")" = capsule ] \
    || { say "the container does not run as user capsule"; return 1; }
}

health() {
  local deadline=$((SECONDS + 60)) code=""
  while [ "$SECONDS" -lt "$deadline" ]; do
    code="$(.venv/bin/python - "$port" <<'PY' 2>/dev/null || true
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5)
    print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
PY
)"
    case "$code" in 200\ *) say "/health: $code"; return 0 ;; esac
    [ "$(docker inspect --format '{{.State.Running}}' "$container")" = true ] || break
    sleep 0.5
  done
  say "/health did not answer 200 (last: ${code:-nothing}); capsule's log:"
  docker logs --tail 30 "$container" >&2 2>&1 || true
  return 1
}

session() {
  .venv/bin/python - "$port" <<'PY'
import sys
from tests.support.clients import BlockingTerminal, SessionEnded

# Waits under capsule's ping interval (20 s): a ping restarts the client's
# socket timeout, so a longer wait could outlast its deadline.
term = BlockingTerminal(f"ws://127.0.0.1:{sys.argv[1]}/ws", timeout=15)
session_id = term.start(timeout=15)
# the answer, not the echo of the command line ("echo ok\r\n")
term.run("echo ok", "\rok\r\n", timeout=15)
term.send_input(b"exit\r")
try:
    term.next("exit", timeout=15)
except SessionEnded:
    pass
term.ws.close()
print(f"session {session_id[:8]}: echo ok answered ok, exit ended it")
PY
}

stop_container() {
  local t0=$SECONDS
  docker stop -t 20 "$container" >/dev/null
  local code took=$((SECONDS - t0))
  code="$(docker inspect --format '{{.State.ExitCode}}' "$container")"
  say "docker stop took ${took}s, exit status $code"
  if [ "$code" != 0 ] || [ "$took" -ge 15 ]; then
    docker logs --tail 30 "$container" >&2 2>&1 || true
    return 1
  fi
  if docker logs "$container" 2>&1 | grep -E 'Unhandled|Traceback|Unable to write' >&2; then
    say "capsule logged an error it should not have"
    return 1
  fi
}

# --- 3. the systemd unit -----------------------------------------------------
verify_unit() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    say "no systemd-analyze here: the unit is not checked"
    return 77
  fi
  # verify fails on a missing ExecStart binary: where /opt/capsule is not
  # installed, check a copy that names the checkout's twistd instead
  local unit=docker/capsule.service
  if [ ! -x /opt/capsule/bin/twistd ]; then
    unit="$work/capsule.service"
    sed "s|/opt/capsule/bin/twistd|$PWD/.venv/bin/twistd|" docker/capsule.service >"$unit"
  fi
  systemd-analyze verify "$unit"
}

# --- 4. the nginx example ----------------------------------------------------
nginx_t() {
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    say "installing nginx (not started)"
    # no service start from the package's scripts
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; } || rc=$?
    if [ -n "$policy" ]; then rm -f "$policy"; fi
    [ "$rc" = 0 ] || return "$rc"
  fi
  local nginx
  nginx="$(command -v nginx || echo /usr/sbin/nginx)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=capsule.example \
    -keyout "$work/privkey.pem" -out "$work/fullchain.pem" 2>/dev/null
  # The previews' wildcard certificate (its server block).
  cp "$work/privkey.pem" "$work/preview-privkey.pem"
  cp "$work/fullchain.pem" "$work/preview-fullchain.pem"
  sed "s|/etc/ssl/capsule/|$work/|" docker/nginx/capsule.conf >"$work/capsule.conf"
  cat >"$work/nginx.conf" <<NGINX
pid $work/nginx.pid;
error_log $work/error.log;
events {}
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    include $work/capsule.conf;
}
NGINX
  "$nginx" -t -q -p "$work" -e "$work/error.log" -c "$work/nginx.conf"
}

t_all=$SECONDS
step "build capsule's image" build_image
if [ "$failed" = 0 ]; then
  step "start it (socket mounted, port 127.0.0.1)" start_container
fi
if [ "$failed" = 0 ]; then
  step "/health answers 200" health
fi
if [ "$failed" = 0 ]; then
  step "one session over the WebSocket: echo ok" session
fi
if [ "$failed" = 0 ]; then
  step "docker stop: exit 0" stop_container
fi
step "systemd-analyze verify docker/capsule.service" verify_unit
step "nginx -t on docker/nginx/capsule.conf" nginx_t

printf '\ndeploy-check summary (%ss):\n' "$((SECONDS - t_all))"
printf '  %s\n' "${summary[@]}"
exit "$failed"
