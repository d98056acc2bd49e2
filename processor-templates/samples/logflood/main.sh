# logflood: writes input.megabytes MiB of output as fast as it can.
. /app/runner.sh
mb=$(sed -n 's/.*"megabytes"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$RUNNER_INPUT")
head -c "$(( ${mb:-1024} * 1024 * 1024 ))" /dev/zero | tr '\0' 'x' | fold -w 100
write_result "{\"megabytes\": ${mb:-1024}}"
