#!/usr/bin/env bash
# Build both targets of docker/Dockerfile with buildah and try them, without a Docker engine or a
# registry: `study` (runs as uid 1000, a smoke study, its report) and `mlflow` (its default
# command alone serves /health, a SQLite store and proxied artifacts it can write).
#
#   docker/test-image.sh              build and test; on success record the inputs' hash
#   docker/test-image.sh --up-to-date exit 0 if docker/image.sha256 matches the inputs, else 1
#
# Needs root, buildah and debootstrap (apt-get install buildah debootstrap), Debian's mirror (apt),
# and whatever package index the host's pip uses; ~17 GB in IMAGE_TEST_DIR (default
# /var/tmp/hdetach-image-test, removed on success unless IMAGE_TEST_KEEP=1), 11-20 min on 2 cores.
# A failed run keeps it: IMAGE_TEST_REUSE=1 then reuses the images it built (only the base is
# always reused), to rerun the checks alone.
#
# The base is a stand-in for python:3.11-slim-bookworm, built here from Debian's packages, since
# no registry is reachable. What differs from the official image:
#   - Python is Debian's python3.11 (3.11.2), not CPython 3.11.16 built from source; it lives in a
#     venv at /usr/local (python3, python, pip, pip3 in /usr/local/bin, packages in
#     /usr/local/lib/python3.11/site-packages), so the Dockerfile's `pip` and `python3` resolve and
#     install where the official image's do, and Debian's PATH (login shells) reaches them.
#   - pip 24.0 and setuptools 65.5.1 as the official 3.11 images ship (the setuptools that made the
#     study target fail: torch 2.14.1 needs >= 77.0.3), plus wheel 0.45.1 as the later ones add.
#   - debootstrap --variant=minbase of bookworm, with debian:bookworm-slim's dpkg path excludes and
#     apt clean-up hooks, its deb822 sources (bookworm, -updates, -security), and ca-certificates,
#     netbase, tzdata, as the official image installs; LANG=C.UTF-8 and its PATH.
#   - It is tagged localhost/python:3.11-slim-bookworm-standin and passed as --build-arg
#     PYTHON_IMAGE (the Dockerfile's FROM pins the official image by digest).
# The builds reach the host's package index through read-only bind mounts (buildah bud --volume):
# the host's pip index, extra index and find-links settings and CA bundle go into
# /etc/xdg/pip/pip.conf of each RUN, and every local folder they name is mounted at its own path.
# Nothing of that is in the image (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."

HASHED=(docker/Dockerfile requirements.lock pyproject.toml)
HASH_FILE=docker/image.sha256
if [[ "${1:-}" == "--up-to-date" ]]; then
  [[ -f "$HASH_FILE" ]] && sha256sum --check --quiet --status "$HASH_FILE"
  exit
fi
[[ $# -eq 0 ]] || { echo "usage: $0 [--up-to-date]" >&2; exit 2; }

WORK=${IMAGE_TEST_DIR:-/var/tmp/hdetach-image-test}
# The build context: this checkout, or (IMAGE_TEST_CONTEXT) another tree, e.g. an export of a commit
# with the docker files to try laid over it, while the working tree is half-way through a change.
CONTEXT=${IMAGE_TEST_CONTEXT:-.}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/python:3.11-slim-bookworm-standin
STUDY=localhost/hdetach-study:test
MLFLOW=localhost/hdetach-study-mlflow:test
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
BUD=("${BUILDAH[@]}" bud --isolation chroot --format docker --pull=never)
RUN=("${BUILDAH[@]}" run --isolation chroot)
START=$SECONDS

say() { printf '[%02d:%02d] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
fail() { say "FAIL: $*" >&2; exit 1; }
for tool in buildah debootstrap sha256sum; do
  command -v "$tool" >/dev/null || fail "$tool not found: apt-get install -y buildah debootstrap"
done
[[ $EUID -eq 0 ]] || fail "run as root (debootstrap and buildah's vfs storage need it)"

containers=()
cleanup() {
  local status=$?
  for ctr in "${containers[@]}"; do "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true; done
  if [[ $status -eq 0 && -z "${IMAGE_TEST_KEEP:-}" ]]; then
    "${BUILDAH[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
mkdir -p "$WORK"
say "buildah $(buildah --version | cut -d' ' -f3), work dir $WORK, context $CONTEXT, $(nproc) CPUs"

# --- the host's pip index, for the builds -------------------------------------------------------
# `pip config list` gives the host's settings, files and PIP_* variables alike; the CA bundle
# defaults to the host's, which holds any TLS-intercepting proxy's CA (this machine has one).
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PIP_HOST="$WORK/pip-host"
mkdir -p "$PIP_HOST"
VOLUMES=(--volume "$PIP_HOST:/etc/xdg/pip:ro")
# pip's own precedence: PIP_* variables over the user's files over the global ones.
"$PYTHON" -m pip config list 2>/dev/null | "$PYTHON" -c '
import re, sys
rank = {":env:": 3, "user": 2, "site": 2, "global": 1}
best = {}
for line in sys.stdin:
    match = re.match(r"([^.]+)\.([\w-]+)=.(.*).$", line.strip())
    if match and match[2] in ("index-url", "extra-index-url", "find-links", "cert"):
        level = rank.get(match[1], 1)
        if level >= best.get(match[2], (0, ""))[0]:
            best[match[2]] = (level, match[3])
print("[global]")
for key, (_, value) in sorted(best.items()):
    print(f"{key} = {value}")
' >"$PIP_HOST/pip.conf"
cert=$(sed -n 's/^cert = //p' "$PIP_HOST/pip.conf")
sed -i '/^cert = /d' "$PIP_HOST/pip.conf"
cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
if [[ -f "$cert" ]]; then
  cp "$cert" "$PIP_HOST/ca.crt"
  echo "cert = /etc/xdg/pip/ca.crt" >>"$PIP_HOST/pip.conf"
fi
# A local index (file:///X/simple, whose pages link to ../../files) is mounted from X; a
# find-links folder as itself.
declare -A mounted=()
for location in $(sed -n 's/^\(index-url\|extra-index-url\|find-links\) = //p' "$PIP_HOST/pip.conf"); do
  path=${location#file://}
  [[ "$path" == /* && -e "$path" ]] || continue
  [[ "$(basename "$path")" == simple ]] && path=$(dirname "$path")
  if [[ -z "${mounted[$path]:-}" ]]; then
    mounted[$path]=1
    VOLUMES+=(--volume "$path:$path:ro")
  fi
done
say "pip for the builds: $(grep -v '^\[' "$PIP_HOST/pip.conf" | tr '\n' ';')"

# --- the stand-in base ------------------------------------------------------------------------
if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  say "base $BASE: already built, reused"
else
  say "base: debootstrap bookworm from $MIRROR"
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase \
    --include=ca-certificates,netbase,tzdata,python3.11,python3.11-venv,python3-distutils \
    bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap (log: $WORK/debootstrap.log)"; }
  # debian:bookworm-slim's settings (docker-library's mkimage: slim excludes, apt clean-up).
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar --numeric-owner -C "$rootfs" -cf "$WORK/rootfs.tar" .
  rm -rf "$rootfs"
  cat >"$WORK/Containerfile.base" <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
RUN python3.11 -m venv /usr/local \
    && PYTHONDONTWRITEBYTECODE=1 /usr/local/bin/python3 -m pip install --disable-pip-version-check \
        --no-cache-dir --no-compile pip==24.0 setuptools==65.5.1 wheel==0.45.1 \
    && rm -rf /root/.cache
CMD ["python3"]
EOF
  "${BUD[@]}" "${VOLUMES[@]}" -f "$WORK/Containerfile.base" -t "$BASE" "$WORK" \
    >"$WORK/base-build.log" 2>&1 \
    || { tail -20 "$WORK/base-build.log"; fail "base build (log: $WORK/base-build.log)"; }
  rm -f "$WORK/rootfs.tar"
  say "base built: $("${RUN[@]}" "$("${BUILDAH[@]}" from --pull-never "$BASE")" -- \
    sh -c 'python3 -V; pip --version | cut -d" " -f1-2; pip list 2>/dev/null | grep -E "^(setuptools|wheel) "' \
    | tr -s ' \n' ' ')"
  "${BUILDAH[@]}" rm --all >/dev/null
fi

# --- build both targets ---------------------------------------------------------------------------
build() {  # TARGET TAG
  local began=$SECONDS
  if [[ -n "${IMAGE_TEST_REUSE:-}" ]] && "${BUILDAH[@]}" inspect --type image "$2" >/dev/null 2>&1; then
    say "target $1: $2 already built, reused (IMAGE_TEST_REUSE)"
    return
  fi
  say "build target $1"
  "${BUD[@]}" "${VOLUMES[@]}" --build-arg PYTHON_IMAGE="$BASE" \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -f "$CONTEXT/docker/Dockerfile" --target "$1" -t "$2" "$CONTEXT" >"$WORK/build-$1.log" 2>&1 \
    || { tail -40 "$WORK/build-$1.log"; fail "target $1 does not build (log: $WORK/build-$1.log)"; }
  say "built $1 in $(((SECONDS - began) / 60)) min $(((SECONDS - began) % 60)) s"
}
build mlflow "$MLFLOW"
build study "$STUDY"
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | sed 's/^/    image /'

# The build's by-products: none may be left in an image. buildah (1.28) leaves the mount points of
# `bud --volume` as empty folders (docker build has no such mounts): those must stay empty.
MOUNT_POINTS=$(printf '%s\n' "${VOLUMES[@]}" | sed -n 's/^[^-][^:]*:\([^:]*\):ro$/\1/p' | tr '\n' ' ')
leftovers() {  # CONTAINER
  "${RUN[@]}" --user 0:0 "$1" -- bash -c '
    shopt -s nullglob dotglob
    for path in /app/build /app/*.egg-info /app/study /app/pyproject.toml /app/README.md /tmp/* \
        /root/.cache/* /var/lib/apt/lists/*_Packages* /var/cache/apt/archives/*.deb; do
      [[ -e $path ]] && echo "$path"
    done
    for path in "$@"; do
      [[ -e $path && -n "$(ls -A "$path")" ]] && echo "$path (not empty)"
    done
    true' leftovers $MOUNT_POINTS
}
# --- the study image ----------------------------------------------------------------------------
ctr=$("${BUILDAH[@]}" from --pull-never "$STUDY")
containers+=("$ctr")
left=$(leftovers "$ctr")
[[ -z "$left" ]] || fail "study image: build leftovers: $left"
say "study image: no build leftovers (empty mount points of the build: $MOUNT_POINTS)"
who=$("${RUN[@]}" "$ctr" -- id)
say "study image: id: $who"
[[ "$who" == "uid=1000(study) gid=1000(study)"* ]] || fail "study image: not uid 1000"
say "study image: study run search_spaces/quick.yaml --smoke"
"${RUN[@]}" "$ctr" -- study run search_spaces/quick.yaml --smoke 2>&1 | sed 's/^/    /' \
  || fail "study image: the smoke study failed"
say "study image: study report quick"
"${RUN[@]}" "$ctr" -- study report quick 2>&1 | sed 's/^/    /' \
  || fail "study image: the report failed"
say "study image: study plan search_spaces/paper --gpu h100 --estimate (the shipped cost tables)"
"${RUN[@]}" "$ctr" -- study plan search_spaces/paper --gpu h100 --estimate 2>&1 | grep '^all 8' \
  | sed 's/^/    /' || fail "study image: no estimate from the image's cost tables"

# --- the mlflow image: its default command, alone -------------------------------------------------
ctr=$("${BUILDAH[@]}" from --pull-never "$MLFLOW")
containers+=("$ctr")
left=$(leftovers "$ctr")
[[ -z "$left" ]] || fail "mlflow image: build leftovers: $left"
say "mlflow image: no build leftovers"
default=$("${BUILDAH[@]}" inspect --type image \
  --format '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}{{range .Docker.Config.Cmd}}{{.}} {{end}}' \
  "$MLFLOW")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# buildah run shares the host's network: on 127.0.0.1 and a free port, by the image's own
# MLFLOW_HOST / MLFLOW_PORT variables, so the command itself is the default one.
say "mlflow image: default command '$default' on 127.0.0.1:$port"
"${RUN[@]}" --env MLFLOW_HOST=127.0.0.1 --env MLFLOW_PORT="$port" "$ctr" -- bash -c "
  # Its own process group, so that stopping it stops its uvicorn workers too.
  setsid $default >/tmp/server.log 2>&1 &
  server=\$!
  python3 - $port <<'EOF' || { tail -30 /tmp/server.log; kill -- -\$server; exit 1; }
import json, sys, time, urllib.request as r
base = f'http://127.0.0.1:{sys.argv[1]}'
deadline = time.monotonic() + 120
while True:
    try:
        health = r.urlopen(base + '/health', timeout=2).read().decode()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
print('    /health:', health)
# The default store and artifact root are writable: an experiment, a run, an artifact through
# the server's proxy.
def call(path, body):
    req = r.Request(base + path, json.dumps(body).encode(), {'Content-Type': 'application/json'})
    return json.load(r.urlopen(req, timeout=10))
exp = call('/api/2.0/mlflow/experiments/create', {'name': 'image-test'})['experiment_id']
run = call('/api/2.0/mlflow/runs/create', {'experiment_id': exp})['run']['info']
put = r.Request(base + '/api/2.0/mlflow-artifacts/artifacts/' + exp + '/' + run['run_id']
                + '/artifacts/probe.txt', b'ok', method='PUT')
r.urlopen(put, timeout=10).read()
print('    store:', run['artifact_uri'], 'artifact probe.txt uploaded')
EOF
  kill -- -\$server
  wait \$server 2>/dev/null || true
  ls -ln /mlflow /mlartifacts | sed 's/^/    /'
"
say "mlflow image: served alone"

sha256sum "${HASHED[@]}" >"$HASH_FILE"
say "PASS in $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s; disk: $(du -sh "$WORK" | cut -f1); $HASH_FILE updated"
