# Sourced by the GPU scripts, from the repo root: installs the wheels carried in .whl/ (made on
# the CPU side by ../shared/device/wheels.sh) into /tmp/site and puts /tmp/site on PYTHONPATH.
# Without .whl/ it does nothing.
use_carried_wheels() {
  ls .whl/*.whl >/dev/null 2>&1 || return 0
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

# require_modules NAME...: exit 2 naming the first module python cannot import, with how to carry it.
require_modules() {
  local name
  for name in "$@"; do
    "${PY:-python3}" -c "import $name" 2>/dev/null || {
      echo "$name is missing: run ../shared/device/wheels.sh $name and carry .whl"
      exit 2
    }
  done
}
