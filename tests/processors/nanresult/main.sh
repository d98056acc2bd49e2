# nanresult: writes a result.json with a non-strict JSON number, chosen by input.mode.
. /app/runner.sh
mode=$(input_field mode)
echo "mode=$mode"
case "$mode" in
  nan) write_result '{"x": NaN}' ;;
  infinity) write_result '{"x": [1, -Infinity]}' ;;
  bigfloat) write_result '{"x": 1e999}' ;;
  bigint) write_result "{\"x\": $(head -c 5000 /dev/zero | tr '\0' '9')}" ;;
  ok) write_result '{"x": 1.5}' ;;
esac
