"""A template processor: replace the body of main() with your work."""

from runner_processor import read_input, run_id, write_result


def main():
    data = read_input()
    print(f"run {run_id()}: got {len(data)} input keys", flush=True)
    write_result({"keys": sorted(data)})


if __name__ == "__main__":
    main()
