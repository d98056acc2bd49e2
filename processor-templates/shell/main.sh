# A template shell processor: replace the body with your work.
. /app/runner.sh
size=$(read_input | wc -c)
echo "run $RUNNER_RUN_ID attempt $RUNNER_ATTEMPT: input is $size bytes"
for file in "$RUNNER_IN"/*; do  # files submitted with the run
  if [ -f "$file" ]; then echo "file ${file##*/}: $(wc -c <"$file") bytes"; fi
done
if [ "$(input_field retry)" = true ]; then
  # A transient problem (a dependency not ready, say): exit 75, "retry me".
  retry_me "asked to retry by the input"
fi
# Files you leave under $RUNNER_OUT become artifacts, e.g.:
# echo "..." >"$(runner_artifact report/summary.txt)"
write_result "{\"input_bytes\": $size}"
