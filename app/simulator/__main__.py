"""`python -m app.simulator --port 8188 --data-dir D --time-scale X --node-delay S [--instances N] [--parallel P]`:
run the ComfyUI simulator (for tests and demos) in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from .server import DEFAULT_DATA_DIR, run_simulator, run_simulators


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.simulator", description="Run the ComfyUI simulator (tests and demos only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="holds output/, input/ and temp/")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies TestSleepProgress's sleep (0.1: slow.json takes 2 s)")
    parser.add_argument("--node-delay", type=float, default=0.0, help="seconds added to every executed node (simulated GPU time)")
    parser.add_argument("--instances", type=int, default=1,
                        help="serve this many independent simulated servers, on ports PORT to PORT+N-1 (benchmarks)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="prompts each server runs at once (benchmarks of many long prompts only: a real "
                             "ComfyUI runs one prompt at a time, which the default of 1 keeps)")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if args.instances > 1:
        run_simulators(args.instances, host=args.host, port=args.port, data_dir=args.data_dir,
                       time_scale=args.time_scale, node_delay=args.node_delay, parallel=args.parallel)
        return
    run_simulator(host=args.host, port=args.port, data_dir=args.data_dir, time_scale=args.time_scale,
                  node_delay=args.node_delay, parallel=args.parallel)


if __name__ == "__main__":
    main()
