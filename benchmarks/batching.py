"""Dynamic batching vs one model call per request, under concurrent clients.

``--clients`` threads each send requests back to back (a closed loop, like a busy
server's worker threads) for ``--seconds`` per contender:

* direct: every client thread calls the model itself, one item at a time (the naive
  Flask app: no batcher, torch threads fighting each other);
* batcher, max 1: requests go through ``DynamicBatcher`` but never share a call, which
  isolates the cost of the queue and thread hop;
* batcher, max N: ``max_batch_size`` as ``measure_batch_scaling`` chose it at warm-up;
* batcher, max 32: a fixed large cap, for comparison.

With a closed loop no request arrives while all clients wait, so a cap above
``--clients`` waits out ``--max-delay-ms`` on every batch: the chosen cap is an upper
bound for a busy server, and ``max_delay_ms`` is the price of a half-full batch.

Contenders run in rounds, in rotating order, so background load lands on all alike;
each cell is the median over rounds. Speedup is requests/s over "direct".

    python benchmarks/batching.py             # about 40 s
    python benchmarks/batching.py --quick     # about 10 s
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import console, machine_summary, percentile, print_table, ratio

from torchship.batching import DynamicBatcher, measure_batch_scaling


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).eval()


@dataclass
class Run:
    requests_per_s: float
    latencies_ms: list[float]
    mean_batch: float


def drive(call: Callable[[torch.Tensor], object], clients: int, seconds: float) -> Run:
    """``clients`` threads call ``call`` back to back for ``seconds``; all latencies kept."""
    x = torch.randn(784)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        start.wait()
        mine = latencies[i]
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            call(x)
            mine.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    flat = [v for per in latencies for v in per]
    return Run(len(flat) / elapsed, flat, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1 s per contender, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 2

    model = make_model()
    torch.set_grad_enabled(False)
    sample = torch.randn(64, 784)

    def predict(items: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(model(torch.stack(items)).unbind(0))

    def direct(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x.unsqueeze(0))

    with torch.inference_mode():
        scaling = measure_batch_scaling(lambda n: model(sample[:n]), (1, 2, 4, 8, 16, 32, 64))
    console.print(f"[bold]Batch scaling at warm-up[/bold] (chosen: {scaling.chosen})")
    console.print(scaling.table())

    batchers = {
        f"batcher, max {size}": DynamicBatcher(
            predict,
            max_batch_size=size,
            max_delay_ms=args.max_delay_ms,
            max_queue_size=4 * args.clients,
            name=f"bench-{size}",
        ).start()
        for size in dict.fromkeys((1, scaling.chosen, 32))
    }
    contenders: dict[str, Callable[[torch.Tensor], object]] = {"direct": direct}
    contenders.update({label: b.submit for label, b in batchers.items()})

    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            batcher = batchers.get(name)
            before = batcher.stats if batcher else None
            run = drive(contenders[name], args.clients, args.seconds)
            if batcher and before:
                after = batcher.stats
                ran = after.batches - before.batches
                run.mean_batch = (after.completed - before.completed) / ran if ran else 0.0
            runs[name].append(run)
    for b in batchers.values():
        b.stop()

    baseline = statistics.median(r.requests_per_s for r in runs["direct"])
    rows = []
    for name, rs in runs.items():
        rps = statistics.median(r.requests_per_s for r in rs)
        lat = [v for r in rs for v in r.latencies_ms]
        rows.append(
            [
                name,
                f"{statistics.median(r.mean_batch for r in rs):.1f}",
                f"{rps:,.0f}",
                f"{percentile(lat, 50):.2f}",
                f"{percentile(lat, 99):.2f}",
                ratio(rps, baseline),
            ]
        )
    print_table(
        f"{args.clients} concurrent clients, MLP 784-1024-1024-10, batch-1 requests",
        ["contender", "mean batch", "requests/s", "p50 ms", "p99 ms", "speedup"],
        rows,
        caption=f"{machine_summary()}; max_delay_ms={args.max_delay_ms}, "
        f"{args.rounds} rounds x {args.seconds:g} s",
    )


if __name__ == "__main__":
    main()
