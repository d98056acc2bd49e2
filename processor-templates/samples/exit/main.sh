# exit: exits with input.code.
. /app/runner.sh
code=$(sed -n 's/.*"code"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$RUNNER_INPUT")
echo "exiting with ${code:-0}" >&2
exit "${code:-0}"
