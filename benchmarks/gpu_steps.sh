# Sourced by gpu_check.sh and gpu_smoke.sh. A step that fails is reported and the others still
# run: device time is scarce, and one broken step must not cost the figures of the rest.
# `finish` exits non-zero, naming the failed steps, if any failed.
failed=()
step() {
  local name=$1; shift
  echo "== $name"
  "$@" || { echo "!! $name failed (exit $?)"; failed+=("$name"); }
}
finish() {
  if [ ${#failed[@]} -gt 0 ]; then echo "FAILED steps: ${failed[*]}"; exit 1; fi
  echo "all steps passed"
}
