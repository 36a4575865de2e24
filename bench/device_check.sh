#!/usr/bin/env bash
# The device check for a lent GPU, as one command (see bench/device_check.py for its steps and limits):
#   here, once:   .venv/bin/python bench/device_check.py --build-kit        # build/device-kit, about 20 MiB
#   on the GPU:   bash bench/device_check.sh                                # carry build/device-kit; results in $OUT
#   dry, on CPU:  bash bench/device_check.sh --device cpu --dry --out DIR   # what tests/test_device_check.py runs
# Installs from the kit's wheels what the machine's Python lacks (no index, nothing downloaded), then runs the
# steps with the code of this working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${DEVICE_CHECK_SYSTEM_PYTHON:-}" ] && PYTHON=.venv/bin/python
KIT=build/device-kit
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[i]}" = "--kit" ] && KIT=${args[i + 1]}; done
if ! "$PYTHON" -c "import optuna, sqlalchemy, fastapi, pydantic_settings, httpx, pytest" 2>/dev/null; then
    echo "installing the kit's wheels ($KIT/wheels) into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$KIT/wheels" \
        $("$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import device_check; print(*device_check.KIT_ROOTS)")
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
exec "$PYTHON" bench/device_check.py "$@"
