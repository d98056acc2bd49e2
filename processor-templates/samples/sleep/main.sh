# sleep: sleeps for input.seconds, or forever when the input has none.
. /app/runner.sh
seconds=$(sed -n 's/.*"seconds"[[:space:]]*:[[:space:]]*\([0-9.]*\).*/\1/p' "$RUNNER_INPUT")
echo "sleeping ${seconds:-forever}"
if [ -n "$seconds" ]; then sleep "$seconds"; else while :; do sleep 3600; done; fi
write_result "{\"slept\": ${seconds:-0}}"
