# A template shell processor: replace the body with your work.
. /app/runner.sh
size=$(read_input | wc -c)
echo "run $RUNNER_RUN_ID attempt $RUNNER_ATTEMPT: input is $size bytes"
if [ "$(input_field retry)" = true ]; then
  # A transient problem (a dependency not ready, say): exit 75, "retry me".
  retry_me "asked to retry by the input"
fi
write_result "{\"input_bytes\": $size}"
