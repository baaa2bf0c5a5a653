#!/usr/bin/env bash
# Install the AffectEdge edge agent as a systemd service on this PC. Run as root from a source checkout:
#
#   sudo deploy/systemd/install.sh            # or: sudo edge-agent install-service
#
# What it does (idempotent; re-run to upgrade):
#   1. user    system user `affectedge` (no login, no home), member of `video` for the cameras
#   2. dirs    /opt/affectedge (code, venv, models), /etc/affectedge (config, root:affectedge 0750);
#              the state dir /var/lib/affectedge (spool) is created by systemd (StateDirectory=)
#   3. venv    /opt/affectedge/venv with this checkout's `affectedge[edge]` (no TensorFlow);
#              offline PCs: PIP_ARGS="--no-index --find-links /path/to/wheels"
#   4. models  models/manifest.json and every file it lists (encoder, head, encoder.int8, ...), mtcnn/*.onnx,
#              TensorRT *.engine files and their engines.*.json records, at the same relative paths;
#              engines already installed are removed first (stale ones would run an older model); the last
#              step then says how to rebuild them, as the agent runs on the CPU until then
#   5. config  /etc/affectedge/agent.toml from deploy/agent.example.toml, only if absent (never overwritten)
#   6. enable  the unit affectedge-agent.service (a first install does not start it: edit the config, check
#              it, then start; an upgrade restarts it if it runs, or it would keep the old code and model)
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=/opt/affectedge
CONF=/etc/affectedge
UNIT=affectedge-agent.service
# the system interpreter by default: one under a private home (pyenv in /root) is not runnable by the service user
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || true)}
PIP_ARGS=${PIP_ARGS:-}

# step 4 starts here: engines built for the model being replaced would run it, so they go, and
# REMOVED_ENGINES lists them for the last step
remove_engines() {
    REMOVED_ENGINES=$(find "$PREFIX/models" -name '*.engine' -print -delete)
}

# the last step: restart a running agent (an upgrade: `systemctl start` does nothing on a running unit,
# which keeps the old code and model until a reboot), else say how to start it. `is-active` fails where
# systemd does not run (an image build, a chroot). Then, if engines were removed and the checkout did not
# bring them back, how to rebuild them: without them `backend = "auto"` runs on the CPU, and says so only
# in the journal. Built as root: $PREFIX/models is root's, and the engines must be readable by the agent.
# Functions, so the tests run them alone: sourcing this script defines them and returns before any step.
finish() {
    if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
        systemctl try-restart "$UNIT"
        echo "Upgraded: $UNIT was running and has been restarted on the new code and model (journalctl -u $UNIT -f)."
    else
        cat <<DONE
Installed. Next:
  1. edit $CONF/agent.toml (agent id, classroom, cameras, broker)
  2. cd $PREFIX && sudo -u affectedge $PREFIX/venv/bin/edge-agent check --config $CONF/agent.toml
     (as the unit runs it: user affectedge in $PREFIX, where the relative model.dir "models" points)
  3. sudo systemctl start $UNIT && journalctl -u $UNIT -f
DONE
    fi
    local engine
    while IFS= read -r engine; do
        if [ -n "$engine" ] && [ ! -f "$engine" ]; then
            echo "TensorRT engines removed: they were built for the previous model, and until they are rebuilt, [model] backend = \"auto\" runs on the CPU. Rebuild them, then restart the agent: cd $PREFIX && sudo $PREFIX/venv/bin/model_export build --fp16 && sudo systemctl try-restart $UNIT"
            return
        fi
    done <<< "${REMOVED_ENGINES:-}"
}
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

die() { echo "install.sh: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0"
command -v systemctl >/dev/null || die "systemd is required (systemctl not found)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11"
[ -f "$SRC/models/manifest.json" ] || die "$SRC/models/manifest.json is missing: export the model first (model_export export)"

echo "1/6 user"
getent group video >/dev/null || groupadd --system video
if ! id affectedge >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --groups video --comment "AffectEdge edge agent" affectedge
fi

echo "2/6 dirs"
install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/models" "$PREFIX/models/mtcnn" "$PREFIX/deploy"
install -d -m 0750 -o root -g affectedge "$CONF"

echo "3/6 venv"
runs_as_service() { runuser -u affectedge -- "$1" -c 'import sys' 2>/dev/null; }
if [ -x "$PREFIX/venv/bin/python" ] && ! runs_as_service "$PREFIX/venv/bin/python"; then
    echo "    rebuilding $PREFIX/venv: user affectedge cannot run its interpreter"
    rm -rf "$PREFIX/venv"
fi
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
runs_as_service "$PREFIX/venv/bin/python" \
    || die "user affectedge cannot run $PYTHON (is it under a private directory such as /root?): install Python 3.11 system-wide (apt-get install python3-venv) and set PYTHON=/usr/bin/python3"
# shellcheck disable=SC2086  # PIP_ARGS is a list of options
"$PREFIX/venv/bin/pip" install --quiet $PIP_ARGS --upgrade "$SRC[edge]"

echo "4/6 models"
MODEL_FILES=$("$PREFIX/venv/bin/python" -c '
import json, sys
print("\n".join(entry["file"] for entry in json.load(open(sys.argv[1]))["files"].values()))
' "$SRC/models/manifest.json") || die "$SRC/models/manifest.json is not a valid manifest: re-export the model (model_export export)"
while IFS= read -r file; do  # all present before anything installed is touched
    [ -f "$SRC/models/$file" ] || die "$SRC/models/$file (listed in manifest.json) is missing: re-export the model (model_export export)"
done <<< "$MODEL_FILES"
remove_engines
while IFS= read -r file; do
    install -D -m 0644 "$SRC/models/$file" "$PREFIX/models/$file"
done <<< "$MODEL_FILES"
install -m 0644 "$SRC/models/manifest.json" "$PREFIX/models/"
install -m 0644 "$SRC"/models/mtcnn/*.onnx "$PREFIX/models/mtcnn/"
# engines and their build records, at their relative paths (a failed install fails the pipeline)
(cd "$SRC/models" && find . \( -name '*.engine' -o -name 'engines.*.json' \) -print0) |
    while IFS= read -r -d '' file; do install -D -m 0644 "$SRC/models/$file" "$PREFIX/models/$file"; done
install -m 0644 "$SRC/deploy/agent.example.toml" "$PREFIX/deploy/"

echo "5/6 config"
if [ -f "$CONF/agent.toml" ]; then
    echo "    keeping the existing $CONF/agent.toml"
else
    install -m 0640 -o root -g affectedge "$SRC/deploy/agent.example.toml" "$CONF/agent.toml"
fi

echo "6/6 enable"
install -m 0644 "$SRC/deploy/systemd/$UNIT" "/etc/systemd/system/$UNIT"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else
    # building a lab-PC image or in a chroot: systemd reads the unit when the machine boots
    echo "    systemd is not running here: the unit is enabled for the next boot"
fi
systemctl enable "$UNIT"
finish
