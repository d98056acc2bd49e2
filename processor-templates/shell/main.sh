# A template shell processor: replace the body with your work.
. /app/runner.sh
echo "run $RUNNER_RUN_ID attempt $RUNNER_ATTEMPT: input is $(wc -c <"$RUNNER_INPUT") bytes"
write_result "{\"input_bytes\": $(wc -c <"$RUNNER_INPUT")}"
