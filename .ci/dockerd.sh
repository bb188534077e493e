#!/usr/bin/env bash
# Make a Docker engine available to capsule's CI on a fresh Debian 12 machine.
#
# usage: .ci/dockerd.sh start|stop|status
#
#   start   if `docker info` answers already, do nothing. Otherwise install
#           docker.io (and debootstrap, which docker/build-image.sh falls back
#           on when no registry is reachable) if missing, start dockerd in the
#           background and wait until it answers.
#   stop    stop the dockerd that `start` started, and only that one.
#   status  say whether the engine answers and whether `start` started it.
#
# environment:
#   CAPSULE_CI_STATE      state directory (default ${TMPDIR:-/tmp}/capsule-ci-dockerd)
#   CAPSULE_DOCKERD_ARGS  extra dockerd arguments (word-split)
#   CAPSULE_DOCKERD_WAIT  seconds to wait for the engine (default 60)
set -euo pipefail

state="${CAPSULE_CI_STATE:-${TMPDIR:-/tmp}/capsule-ci-dockerd}"
pidfile="$state/dockerd.pid"
logfile="$state/dockerd.log"
wait_s="${CAPSULE_DOCKERD_WAIT:-60}"

say() { printf 'dockerd.sh: %s\n' "$*" >&2; }
die() { printf 'dockerd.sh: error: %s\n' "$*" >&2; exit 1; }

engine_up() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root for: $*"
  fi
}

# kill -0 would fail with EPERM on root's dockerd when run through sudo
alive() {
  [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# the pid in the pid file, if that process is still a dockerd
our_pid() {
  [ -f "$pidfile" ] || return 1
  local pid comm
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  case "$pid" in ''|*[!0-9]*) return 1 ;; esac
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [ "$comm" = dockerd ] || return 1
  printf '%s\n' "$pid"
}

install_missing() {
  local pkgs=()
  command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || pkgs+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || pkgs+=(debootstrap)
  [ "${#pkgs[@]}" -gt 0 ] || return 0
  say "installing ${pkgs[*]}…"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}"
}

cmd_start() {
  local pid
  if engine_up; then
    say "the Docker engine already answers; nothing to start"
    return 0
  fi
  if pid="$(our_pid)"; then
    say "dockerd (pid $pid) started earlier is still coming up"
  else
    install_missing
    # installing docker.io may have started the engine through the init system
    if engine_up; then
      say "the Docker engine answers after installing it; nothing to start"
      return 0
    fi
    local dockerd
    dockerd="$(command -v dockerd || echo /usr/sbin/dockerd)"
    [ -x "$dockerd" ] || die "dockerd not found after installing docker.io"
    mkdir -p "$state"
    say "starting $dockerd (log: $logfile)"
    # not through as_root: a backgrounded function would put a subshell's
    # pid in $!; nohup execs dockerd, so $! is dockerd itself when root
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null 2>&1 || die "need root to start dockerd"
      sudo=(sudo -n)
    fi
    # --live-restore: containers (and so sessions) keep running while dockerd
    # restarts, as capsule expects of a production engine.
    # shellcheck disable=SC2086  # CAPSULE_DOCKERD_ARGS is meant to be split
    "${sudo[@]}" nohup "$dockerd" --live-restore ${CAPSULE_DOCKERD_ARGS:-} </dev/null >"$logfile" 2>&1 &
    pid=$!
    # through sudo, $! is sudo; record dockerd itself
    if [ "${#sudo[@]}" -gt 0 ]; then
      sleep 1
      pid="$(pgrep -P "$pid" -x dockerd 2>/dev/null || echo "$pid")"
    fi
    echo "$pid" >"$pidfile"
  fi

  local i=0
  while [ "$i" -lt "$wait_s" ]; do
    if engine_up; then
      say "the Docker engine answers (dockerd pid $(cat "$pidfile"), $(docker version --format '{{.Server.Version}}' 2>/dev/null))"
      return 0
    fi
    if ! alive "$(cat "$pidfile")"; then
      say "dockerd exited; last lines of $logfile:"
      tail -n 40 "$logfile" >&2 || true
      rm -f "$pidfile"
      die "dockerd did not start"
    fi
    sleep 1
    i=$((i + 1))
  done
  say "no answer from dockerd after ${wait_s} s; last lines of $logfile:"
  tail -n 40 "$logfile" >&2 || true
  die "the Docker engine did not come up"
}

cmd_stop() {
  if [ ! -f "$pidfile" ]; then
    say "no $pidfile: this script started no dockerd; nothing to stop"
    return 0
  fi
  local pid
  if ! pid="$(our_pid)"; then
    say "dockerd from $pidfile is gone already"
    rm -f "$pidfile"
    return 0
  fi
  say "stopping dockerd (pid $pid)…"
  as_root kill -TERM "$pid" 2>/dev/null || true
  local i=0
  while [ "$i" -lt 20 ] && alive "$pid"; do
    sleep 1
    i=$((i + 1))
  done
  if alive "$pid"; then
    say "dockerd still running after 20 s; sending KILL"
    as_root kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  say "stopped"
}

cmd_status() {
  local pid
  if engine_up; then say "the Docker engine answers"; else say "the Docker engine does not answer"; fi
  if pid="$(our_pid)"; then say "started by this script: dockerd pid $pid"; else say "no dockerd started by this script"; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h|--help|help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
