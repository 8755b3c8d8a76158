#!/usr/bin/env bash
# Install polarkvd as a system service: a private virtual environment holding the package, the
# `polarkvd` command, the systemd unit, the sysusers.d entry, the docs and the config file.
#
#   sudo ./scripts/install.sh                         into /usr/local, config /etc/polarkv.toml
#   sudo PREFIX=/usr ./scripts/install.sh             distribution layout (/usr/lib/systemd/system)
#   DESTDIR=/tmp/stage ./scripts/install.sh           stage for a package: files land under DESTDIR,
#                                                     the paths inside them are the final ones
#   ./scripts/install.sh --wheel dist/polarkvd-*.whl --extras vllm,tui
#
# Variables: PREFIX (/usr/local), SYSCONFDIR (/etc), DESTDIR (empty), PYTHON (python3),
# LIBDIR ($PREFIX/lib/polarkvd: the virtual environment), UNITDIR ($PREFIX/lib/systemd/system),
# SYSUSERSDIR ($PREFIX/lib/sysusers.d), DOCDIR ($PREFIX/share/doc/polarkvd).
# Nothing is started and no user is created: the commands for that are printed at the end. An
# existing config file is kept (the new one is written next to it as polarkv.toml.new).
set -euo pipefail
cd "$(dirname "$0")/.."

wheel=""
extras=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) wheel="$2"; shift 2 ;;
        --extras) extras="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
PREFIX="${PREFIX:-/usr/local}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
DESTDIR="${DESTDIR:-}"
[ -n "$DESTDIR" ] && DESTDIR="$(realpath -m -s "$DESTDIR")"
LIBDIR="${LIBDIR:-$PREFIX/lib/polarkvd}"
UNITDIR="${UNITDIR:-$PREFIX/lib/systemd/system}"
SYSUSERSDIR="${SYSUSERSDIR:-$PREFIX/lib/sysusers.d}"
DOCDIR="${DOCDIR:-$PREFIX/share/doc/polarkvd}"
for var in PREFIX SYSCONFDIR LIBDIR UNITDIR SYSUSERSDIR DOCDIR; do
    case "${!var}" in
        /*) ;;
        *) echo "install: $var must be an absolute path, not '${!var}'" >&2; exit 2 ;;
    esac
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -z "$wheel" ]; then
    echo "[install] building the wheel"
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work" .
    wheel="$(ls "$work"/polarkvd-*.whl)"
fi
[ -f "$wheel" ] || { echo "install: no wheel at $wheel" >&2; exit 2; }
wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
spec="$wheel"
[ -n "$extras" ] && spec="polarkvd[$extras] @ file://$wheel"

venv="$DESTDIR$LIBDIR"
echo "[install] virtual environment $venv"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip_args=(--quiet --disable-pip-version-check --upgrade)
# Staged files must not carry DESTDIR: skip byte-compiling (the .pyc files would name the staging
# path); Python compiles on first import, or a package's post-install step does.
[ -n "$DESTDIR" ] && pip_args+=(--no-compile)
"$venv/bin/python" -m pip install "${pip_args[@]}" "$spec"
if [ -n "$DESTDIR" ]; then
    # Scripts' #! lines, activate and pyvenv.cfg name the venv's path: make it the final one.
    grep -rlI --null -F "$DESTDIR" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$DESTDIR||g"
fi

echo "[install] command $DESTDIR$PREFIX/bin/polarkvd"
mkdir -p "$DESTDIR$PREFIX/bin"
ln -sfn "$(realpath -m -s --relative-to="$PREFIX/bin" "$LIBDIR/bin/polarkvd")" "$DESTDIR$PREFIX/bin/polarkvd"

echo "[install] unit $DESTDIR$UNITDIR/polarkvd.service"
mkdir -p "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$DOCDIR" "$DESTDIR$SYSCONFDIR"
sed -e "s|/usr/local/bin/polarkvd|$PREFIX/bin/polarkvd|g" \
    -e "s|/etc/polarkv.toml|$SYSCONFDIR/polarkv.toml|g" \
    -e "s|/usr/local/share/doc/polarkvd|$DOCDIR|g" \
    systemd/polarkvd.service > "$work/polarkvd.service"
install -m 0644 "$work/polarkvd.service" "$DESTDIR$UNITDIR/polarkvd.service"
install -m 0644 systemd/polarkvd.sysusers.conf "$DESTDIR$SYSUSERSDIR/polarkvd.conf"
install -m 0644 docs/OPERATIONS.md docs/METRICS.md "$DESTDIR$DOCDIR/"

config="$DESTDIR$SYSCONFDIR/polarkv.toml"
if [ -e "$config" ]; then
    install -m 0644 etc/polarkv.toml "$config.new"
    echo "[install] kept $config; the shipped one is $config.new"
else
    install -m 0644 etc/polarkv.toml "$config"
    echo "[install] config $config"
fi

if [ -z "$DESTDIR" ]; then
    cat <<EOF
[install] done. Next, as root:
    systemd-sysusers $SYSUSERSDIR/polarkvd.conf     # creates user and group polarkv
    systemctl daemon-reload && systemctl enable --now polarkvd
    usermod -aG polarkv <engine-user>                # users whose engines attach
Engines find the daemon with POLARKV_SOCKET=/run/polarkv/engine.sock.
EOF
fi
