"""echo: logs each input key and returns the input as its result."""

from runner_processor import attempt, read_input, run_id, write_result

data = read_input()
print(f"echo run={run_id()} attempt={attempt()}", flush=True)
for key, value in sorted(data.items()):
    print(f"{key}={value}", flush=True)
write_result({"echo": data})
