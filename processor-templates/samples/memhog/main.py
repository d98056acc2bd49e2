"""memhog: allocates memory until input.megabytes are held (or the OOM killer ends it)."""

from runner_processor import read_input, write_result

target = int(read_input().get("megabytes", 1024))
held = []
for step in range(0, target, 8):
    held.append(bytearray(8 * 1024 * 1024))
    if step % 64 == 0:
        print(f"holding {step + 8} MiB", flush=True)
write_result({"held_mib": len(held) * 8})
