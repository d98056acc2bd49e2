# Helper for shell processors; source it: `. /app/runner.sh`.
# Contract: input at $RUNNER_INPUT, result at $RUNNER_RESULT, logs on stdout/stderr,
# submitted files in $RUNNER_IN (read-only), every other regular file under
# $RUNNER_OUT an artifact; exit 0 = success, exit 75 = transient failure (retry me),
# anything else = failure.
RUNNER_INPUT=/run/input.json
RUNNER_RESULT=/run/out/result.json
RUNNER_IN=/run/in
RUNNER_OUT=/run/out
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

# runner_input_file NAME: print the path of the file submitted as NAME; print an
# error on stderr and return 1 when none was. Use: `f=$(runner_input_file text) || exit 1`.
runner_input_file() {
  case "$1" in
    '' | .* | */*)
      echo "runner_input_file: '$1' is not a file name" >&2
      return 2 ;;
  esac
  if [ ! -f "$RUNNER_IN/$1" ]; then
    echo "runner_input_file: no file '$1' was submitted with this run" >&2
    return 1
  fi
  printf '%s\n' "$RUNNER_IN/$1"
}

# runner_artifact NAME: print the path to write artifact NAME to (under $RUNNER_OUT;
# "/" in NAME makes subdirectories, created here). Refuses (return 2) an absolute
# name, an empty, "." or ".." part, and result.json (use write_result).
# Use: `out=$(runner_artifact counts.csv) || exit 1; sort ... >"$out"`.
runner_artifact() {
  case "/$1/" in
    //* | *//* | */./* | */../*)
      echo "runner_artifact: '$1' must be a relative path inside $RUNNER_OUT" >&2
      return 2 ;;
  esac
  if [ "$1" = result.json ]; then
    echo "runner_artifact: result.json is the run's result: use write_result" >&2
    return 2
  fi
  mkdir -p "$(dirname "$RUNNER_OUT/$1")" || return 1
  printf '%s\n' "$RUNNER_OUT/$1"
}

# retry_me [MESSAGE]: end this attempt as transient (exit 75); the runner retries it
# when the manifest's retry policy allows.
retry_me() {
  echo "${1:-transient failure}" >&2
  exit "$RUNNER_EXIT_RETRY"
}
