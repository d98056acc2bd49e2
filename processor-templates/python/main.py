"""A template processor: replace the body of main() with your work."""

from runner_processor import (
    attempt,
    input_files,
    read_input,
    retry_me,
    run_id,
    write_result,
)


def main():
    data = read_input()
    print(f"run {run_id()} attempt {attempt()}: got {len(data)} input keys", flush=True)
    for name, path in input_files().items():  # files submitted with the run, in /run/in
        print(f"file {name}: {path.stat().st_size} bytes", flush=True)
    if data.get("retry") is True:
        # A transient problem (a dependency not ready, say): exit 75, "retry me".
        retry_me("asked to retry by the input")
    # Files you leave under /run/out become artifacts, e.g.:
    # write_artifact("report/summary.txt", "...")
    write_result({"keys": sorted(data)})


if __name__ == "__main__":
    main()
