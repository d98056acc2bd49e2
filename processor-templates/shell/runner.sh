# Helper for shell processors; source it: `. /app/runner.sh`.
# Contract: input at $RUNNER_INPUT, result at $RUNNER_RESULT, logs on stdout/stderr,
# exit 0 = success, exit 75 = transient failure (retry me), anything else = failure.
RUNNER_INPUT=/run/input.json
RUNNER_RESULT=/run/out/result.json
RUNNER_EXIT_RETRY=75

# write_result JSON: store a JSON value (a string argument) as the run's result.
write_result() {
  printf '%s' "$1" >"$RUNNER_RESULT.tmp" && mv "$RUNNER_RESULT.tmp" "$RUNNER_RESULT"
}

# retry_me [MESSAGE]: end this attempt as transient.
retry_me() {
  echo "${1:-transient failure}" >&2
  exit "$RUNNER_EXIT_RETRY"
}
