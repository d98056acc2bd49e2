"""A template processor: replace the body of main() with your work."""

from runner_processor import attempt, read_input, retry_me, run_id, write_result


def main():
    data = read_input()
    print(f"run {run_id()} attempt {attempt()}: got {len(data)} input keys", flush=True)
    if data.get("retry") is True:
        # A transient problem (a dependency not ready, say): exit 75, "retry me".
        retry_me("asked to retry by the input")
    write_result({"keys": sorted(data)})


if __name__ == "__main__":
    main()
