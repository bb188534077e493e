#!/usr/bin/env bash
# Build the capsule session image, and the agent image on top of it.
#
# usage: docker/build-image.sh [IMAGE [AGENT_IMAGE]]
#
#   IMAGE                  session image (default: $CAPSULE_IMAGE, else capsule-runtime:latest)
#   AGENT_IMAGE            agent image, built FROM IMAGE with docker/agent/ (default:
#                          $CAPSULE_AGENT_IMAGE, else capsule-agent:latest); `none`: no agent image
#
# environment:
#   CAPSULE_IMAGE          default image name
#   CAPSULE_AGENT_IMAGE    default agent image name
#   CAPSULE_REBUILD=1      rebuild even when the images match their Dockerfiles
#   CAPSULE_NO_CACHE=1     build without Docker's layer cache (what is built: from scratch)
#   CAPSULE_BASE           base image (default debian:bookworm-slim)
#   CAPSULE_DEBIAN_MIRROR  mirror for the debootstrap fallback (default http://deb.debian.org/debian)
#   CAPSULE_PULL_TIMEOUT   seconds to wait for `docker pull` of the base (default 60)
#
# When the base image is neither present nor pullable (no registry reachable),
# an equivalent base is bootstrapped with debootstrap and imported as
# capsule-base:bookworm, which later runs reuse.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dockerfile="$here/Dockerfile"

image="${1:-${CAPSULE_IMAGE:-capsule-runtime:latest}}"
agent_image="${2:-${CAPSULE_AGENT_IMAGE:-capsule-agent:latest}}"
agent_dir="$here/agent"
base="${CAPSULE_BASE:-debian:bookworm-slim}"
mirror="${CAPSULE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
pull_timeout="${CAPSULE_PULL_TIMEOUT:-60}"
bootstrap_image="capsule-base:bookworm"
suite="bookworm"

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

command -v docker >/dev/null 2>&1 || die "docker client not found: install docker.io"
if ! docker version --format '{{.Server.APIVersion}}' >/dev/null 2>&1; then
  die "cannot reach the Docker engine: start dockerd (or run .ci/dockerd.sh start)"
fi
[ -f "$dockerfile" ] || die "missing $dockerfile"
if [ "$agent_image" != none ]; then
  for f in Dockerfile package.json package-lock.json; do
    [ -f "$agent_dir/$f" ] || die "missing $agent_dir/$f"
  done
fi

# The image is rebuilt when the Dockerfile or anything it copies changes.
dockerfile_sha="$(cat "$dockerfile" "$here/keeper/capsule-keeper.c" | sha256sum | cut -d' ' -f1)"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
label_of() { docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# --- up to date? -----------------------------------------------------------
runtime_current=0
if [ "${CAPSULE_REBUILD:-0}" != 1 ] && image_exists "$image"; then
  current_sha="$(label_of "$image" io.capsule.dockerfile-sha)"
  if [ "$current_sha" = "$dockerfile_sha" ]; then
    say "image $image is up to date"
    runtime_current=1
  else
    say "image $image was built from another Dockerfile (${current_sha:-no sha label}); rebuilding"
  fi
fi

# --- base image ------------------------------------------------------------
workdir=""
agent_context=""
cleanup() {
  if [ -n "$agent_context" ]; then rm -rf "$agent_context"; fi
  if [ -n "$workdir" ] && [ -d "$workdir" ]; then
    # debootstrap may leave /proc or /sys mounted inside the target on failure
    for m in proc sys dev/pts dev; do
      if mountpoint -q "$workdir/rootfs/$m" 2>/dev/null; then umount -l "$workdir/rootfs/$m" || true; fi
    done
    rm -rf --one-file-system "$workdir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bootstrap_base() {
  command -v debootstrap >/dev/null 2>&1 \
    || die "debootstrap not found: apt-get install debootstrap (or make $base available to docker)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"

  workdir="$(mktemp -d "${TMPDIR:-/tmp}/capsule-base.XXXXXX")"
  local root="$workdir/rootfs"
  local t0=$SECONDS

  say "debootstrap --variant=minbase $suite from $mirror…"
  if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$workdir/debootstrap.log" 2>&1; then
    tail -n 40 "$workdir/debootstrap.log" >&2 || true
    if [ -f "$root/debootstrap/debootstrap.log" ]; then tail -n 40 "$root/debootstrap/debootstrap.log" >&2 || true; fi
    die "debootstrap failed"
  fi

  say "trimming the rootfs to look like $base…"
  # apt sources as in the official image (deb822 there, one-line here: same effect)
  local security="http://deb.debian.org/debian-security"
  case "$mirror" in
    http://deb.debian.org/*|https://deb.debian.org/*) ;;
    *) security="${CAPSULE_DEBIAN_SECURITY_MIRROR:-$security}" ;;
  esac
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF
  # the slim image's dpkg and apt settings: no docs/man pages, no cached debs
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# as in debian:*-slim: no documentation or translations, keep copyright files
path-exclude /usr/share/doc/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-include /usr/share/doc/*/copyright
path-include /usr/share/locale/all_languages
path-include /usr/share/locale/currency/*
path-include /usr/share/locale/l10n/*
path-include /usr/share/locale/languages
path-include /usr/share/locale/locale.alias
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'EOF'
Apt::AutoRemove::SuggestsImportant "false";
EOF
  # what debootstrap already unpacked
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/overrides/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 \
       -not -name locale.alias -not -name languages -not -name all_languages \
       -not -name currency -not -name l10n -exec rm -rf {} + 2>/dev/null || true
  rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/*.deb "$root"/var/cache/apt/*.bin
  rm -rf "$root"/var/lib/apt/lists/*
  mkdir -p "$root/var/lib/apt/lists/partial"
  rm -rf "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/log/bootstrap.log "$root"/tmp/* "$root"/var/tmp/*
  # docker provides these at run time
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"

  say "importing the rootfs as $bootstrap_image…"
  tar -C "$root" --numeric-owner --xattrs \
      --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
      -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $suite $mirror" \
        - "$bootstrap_image" >/dev/null
  say "bootstrapped $bootstrap_image in $((SECONDS - t0)) s"
  rm -rf --one-file-system "$workdir"
  workdir=""
}

no_cache=()
if [ "${CAPSULE_NO_CACHE:-0}" = 1 ]; then no_cache=(--no-cache); fi

# A newer client without the buildx plugin would fall back to the classic
# builder anyway; say so up front instead of failing when DOCKER_BUILDKIT=1.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

build_runtime() {
  if image_exists "$base"; then
    say "base image $base found locally"
  elif [ "$base" = "$bootstrap_image" ]; then
    say "no $bootstrap_image yet, bootstrapping a Debian $suite base with debootstrap…"
    bootstrap_base
  elif [ "$base" = "debian:bookworm-slim" ] && image_exists "$bootstrap_image"; then
    # an earlier run bootstrapped the equivalent base: don't wait on a registry again
    say "reusing the bootstrapped $bootstrap_image in place of $base (docker pull $base to use the official one)"
    base="$bootstrap_image"
  else
    say "pulling $base… (timeout ${pull_timeout} s)"
    if timeout "$pull_timeout" docker pull "$base" >&2; then
      :
    elif image_exists "$bootstrap_image"; then
      say "could not pull $base; using the bootstrapped $bootstrap_image instead"
      base="$bootstrap_image"
    else
      say "no registry reachable, bootstrapping a Debian $suite base with debootstrap…"
      bootstrap_base
      base="$bootstrap_image"
    fi
  fi

  # --- build -----------------------------------------------------------------
  say "building $image from $base…"
  t0=$SECONDS
  docker build "${no_cache[@]}" \
    --build-arg "BASE=$base" \
    --label "io.capsule.dockerfile-sha=$dockerfile_sha" \
    --label "io.capsule.base=$base" \
    -t "$image" \
    -f "$dockerfile" \
    "$here"
  say "built $image in $((SECONDS - t0)) s ($(image_size "$image"))"
}

image_size() {
  local size
  size="$(docker image inspect --format '{{.Size}}' "$1")"
  numfmt --to=iec-i --suffix=B "$size" 2>/dev/null || echo "$size bytes"
}

if [ "$runtime_current" != 1 ]; then build_runtime; fi

# --- the agent image ---------------------------------------------------------
# FROM the session image: rebuilt when docker/agent/ changed or the session
# image is another one (its ID), and the image it replaces is removed (unless
# a container still uses it).
[ "$agent_image" != none ] || exit 0
agent_sha="$(cat "$agent_dir/Dockerfile" "$agent_dir/package.json" "$agent_dir/package-lock.json" | sha256sum | cut -d' ' -f1)"
runtime_id="$(docker image inspect --format '{{.Id}}' "$image")"
previous_id=""
if image_exists "$agent_image"; then
  previous_id="$(docker image inspect --format '{{.Id}}' "$agent_image")"
  current_sha="$(label_of "$agent_image" io.capsule.dockerfile-sha)"
  current_runtime="$(label_of "$agent_image" io.capsule.runtime-id)"
  if [ "${CAPSULE_REBUILD:-0}" != 1 ] && [ "$current_sha" = "$agent_sha" ] && [ "$current_runtime" = "$runtime_id" ]; then
    say "image $agent_image is up to date"
    exit 0
  fi
  if [ "$current_sha" != "$agent_sha" ]; then
    say "image $agent_image was built from another docker/agent/ (${current_sha:-no sha label}); rebuilding"
  elif [ "$current_runtime" != "$runtime_id" ]; then
    say "image $agent_image was built from another $image; rebuilding"
  fi
fi

# The build context: docker/agent/ and the host's CA certificates, which the
# builder stage's npm trusts (behind a proxy that intercepts TLS, the host
# trusts the proxy); the image itself gets none of them.
agent_context="$(mktemp -d "${TMPDIR:-/tmp}/capsule-agent.XXXXXX")"
cp "$agent_dir/Dockerfile" "$agent_dir/package.json" "$agent_dir/package-lock.json" "$agent_context/"
if ls "$agent_dir"/*.crt >/dev/null 2>&1; then cp "$agent_dir"/*.crt "$agent_context/"; fi
system_cas=/etc/ssl/certs/ca-certificates.crt
cas=("$system_cas")
if [ -n "${NODE_EXTRA_CA_CERTS:-}" ] && ! [ "$NODE_EXTRA_CA_CERTS" -ef "$system_cas" ]; then
  cas+=("$NODE_EXTRA_CA_CERTS")
fi
for ca in "${cas[@]}"; do
  if [ -f "$ca" ]; then cat "$ca" >>"$agent_context/host-ca.crt"; fi
done

say "building $agent_image from $image (Node.js and the Claude Code CLI from the npm registry)…"
t0=$SECONDS
docker build "${no_cache[@]}" --force-rm \
  --build-arg "RUNTIME=$image" \
  --label "io.capsule.dockerfile-sha=$agent_sha" \
  --label "io.capsule.runtime-id=$runtime_id" \
  -t "$agent_image" \
  "$agent_context" \
  || die "building $agent_image failed (above); it needs the npm registry and Debian's mirror from inside docker build. To go on without the agent image: make AGENT_IMAGE=none, or none as this script's second argument"
say "built $agent_image in $((SECONDS - t0)) s ($(image_size "$agent_image"))"
# The image this build replaced, once nothing names it any more: another
# tag of the same image (a second checkout's, a test's) keeps it.
if [ -n "$previous_id" ] && [ "$previous_id" != "$(docker image inspect --format '{{.Id}}' "$agent_image")" ] \
    && [ "$(docker image inspect --format '{{len .RepoTags}}' "$previous_id" 2>/dev/null)" = 0 ]; then
  docker rmi "$previous_id" >/dev/null 2>&1 || true
fi
# The builder stage stays as untagged images (the layer cache of the next
# build): the newest, this build's; older ones (over a GiB each) are removed.
docker image ls --no-trunc --filter dangling=true --filter label=io.capsule.stage=agent-builder \
    --format '{{.CreatedAt}}\t{{.ID}}' | sort -r | tail -n +2 | cut -f2 \
  | while read -r old; do docker rmi "$old" >/dev/null 2>&1 || true; done
