# Helper for shell processors; source it: `. /app/runner.sh`.
# Contract: input at $RUNNER_INPUT, result at $RUNNER_RESULT, logs on stdout/stderr,
# exit 0 = success, exit 75 = transient failure (retry me), anything else = failure.
RUNNER_INPUT=/run/input.json
RUNNER_RESULT=/run/out/result.json
RUNNER_EXIT_RETRY=75

# read_input: print the run's input (a JSON object) on stdout.
read_input() {
  cat "$RUNNER_INPUT"
}

# input_field KEY: print the value of the first `"KEY": value` in the input when the
# value is a number, true/false/null or a string without escaped quotes; print
# nothing and return 1 otherwise. Busybox has no JSON parser: this is a pattern
# match, good for flat inputs; anything richer needs the Python template.
input_field() {
  _value=$(sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\(\"[^\"\\\\]*\"\|[-0-9.eE+]\{1,\}\|true\|false\|null\).*/\1/p" "$RUNNER_INPUT" | head -n 1)
  [ -n "$_value" ] || return 1
  case "$_value" in
    \"*) _value=${_value#\"}; _value=${_value%\"} ;;
  esac
  printf '%s\n' "$_value"
}

# write_result JSON: store a JSON value (a string argument) as the run's result.
# Written to a temporary file first and renamed, so a half-written result is never seen.
write_result() {
  printf '%s' "$1" >"$RUNNER_RESULT.tmp" && mv "$RUNNER_RESULT.tmp" "$RUNNER_RESULT"
}

# retry_me [MESSAGE]: end this attempt as transient (exit 75); the runner retries it
# when the manifest's retry policy allows.
retry_me() {
  echo "${1:-transient failure}" >&2
  exit "$RUNNER_EXIT_RETRY"
}
