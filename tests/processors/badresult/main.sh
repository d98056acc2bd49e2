# badresult: leaves a result.json the runner must refuse, chosen by input.mode.
. /app/runner.sh
mode=$(sed -n 's/.*"mode"[[:space:]]*:[[:space:]]*"\([a-z]*\)".*/\1/p' "$RUNNER_INPUT")
target=$(sed -n 's/.*"target"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$RUNNER_INPUT")
echo "mode=$mode target=$target"
case "$mode" in
  symlink) ln -s "${target:-/etc/passwd}" "$RUNNER_RESULT" ;;
  big) head -c 2097152 /dev/zero | tr '\0' '7' >"$RUNNER_RESULT" ;;
  dir) mkdir "$RUNNER_RESULT" ;;
  fifo) mkfifo "$RUNNER_RESULT" ;;
  notjson) echo "this is not json" >"$RUNNER_RESULT" ;;
  ok) write_result '{"ok": true}' ;;
esac
