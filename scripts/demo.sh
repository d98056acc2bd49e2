#!/usr/bin/env bash
# Submit the sample runs to the stack `runner dev up` started and say what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. var/dev/env
export PATH="$PWD/var/venv/bin:$PATH"

show() {  # show TITLE PROCESSOR [submit options...]
  local title=$1 processor=$2
  shift 2
  echo
  echo "== $title"
  echo "\$ runner submit $processor $* --follow"
  local out
  out=$(mktemp)
  runner submit "$processor" "$@" --follow >"$out" || true
  # The logs come first, then the final run object as JSON.
  python3 - "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.find("{")
logs, run = text[:start], json.loads(text[start:])
for line in logs.strip().splitlines()[:6]:
    print("   log |", line[:100])
if len(logs.strip().splitlines()) > 6:
    print("   log | ...")
keys = ["status", "error_code", "exit_code", "result", "log_bytes", "log_truncated"]
print("   run |", run["id"], ", ".join(f"{k}={json.dumps(run[k])}" for k in keys))
print("   took |", run["started_at"], "->", run["finished_at"])
PY
  rm -f "$out"
}

show "echo: input to log lines and a result" echo --input '{"message": "hello from the demo"}'
show "exit 3: a failure the runner reports, not hides" exit --input '{"code": 3}'
show "sleep forever with a 2 s timeout: SIGTERM, grace, gone" sleep --timeout 2
show "memory hog over its 64 MiB limit: killed by the kernel, reported as oom_killed" memhog
show "log flood of 50 MiB: stored up to the 1 MiB cap, marked truncated" logflood --input '{"megabytes": 50}'
show "a file in, an artifact out: README.md at /run/in/text, counts.csv back" wordcount --file text=README.md

echo
echo "== the artifacts of the last wordcount run, downloaded"
last=$(runner runs list --processor wordcount --limit 1 2>/dev/null | awk 'NR==1 {print $1}')
if [ -n "$last" ]; then
  out=var/dev/artifacts/$last
  echo "\$ runner runs artifacts $last --download $out"
  runner runs artifacts "$last" --download "$out" | sed 's/^/   /'
  head -4 "$out/counts.csv" | sed 's/^/   counts.csv | /'
fi

echo
# Workers remove a finished container in the background, just after recording its run.
left() {
  { docker ps -aq --filter label=io.container-runner.worker-id=dev-worker-1
    docker ps -aq --filter label=io.container-runner.worker-id=dev-worker-2; } | wc -l
}
for _ in $(seq 50); do [ "$(left)" -eq 0 ] && break; sleep 0.2; done
echo "== containers left behind: $(left)"
echo
echo "The stack is still up. Try:  . var/dev/env && runner runs list"
echo "Stop it with:                make down   (runner dev down)"
