"""Lesson 07 — Model versioning: A/B tests, canaries that roll back by themselves, rollback.

What you will see, against a real torchship server on a free local port:
  1. two versions of the digits model in the store (a CNN and an MLP), with stages;
  2. an A/B test: traffic split 50/50, sticky per user, measured accuracy and latency
     of each version side by side;
  3. canaries planned 10% -> 50% -> 100%, each step a few seconds, guarded by an SLO:
     a healthy version walks the steps to 100% and so becomes production in the store;
     a deliberately broken one breaches its SLO at 10% and rolls back by itself, and
     the history records why;
  4. a manual rollback and promotion, and the model's audit trail.

Run: python 07_model_versioning.py   (offline, ~40 s; starts and stops its own server)
"""

import random
import signal
import subprocess
import sys
import time
from collections import defaultdict

import requests

from torchship.store import ModelStore, stages
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import digits
from torchship.zoo.faulty import FaultyDigits

work = workdir("lesson_07")
store = ModelStore(work / "models")
data = digits.load_digits_split()

section("1. Versions in the store")
for arch in ("cnn", "mlp"):
    result = digits.train(arch, data=data)
    m = store.save(
        result.model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        metrics={"test_accuracy": result.test_accuracy},
        examples=data.x_test[:32],
        description=f"digits {arch}",
    )
    say(f"saved {m.ref} ({arch}), offline test accuracy {result.test_accuracy:.2%}")
# It passes warm-up, then fails 35% of batches: a bug that only production load shows.
broken = FaultyDigits(fail_rate=0.35, healthy_calls=20)
broken.load_state_dict(result.model.state_dict())
m3 = store.save(
    broken,
    "digits",
    input_spec=digits.input_spec(),
    labels=digits.LABELS,
    examples=data.x_test[:32],
    description="MLP with a production bug",
)
stages.promote(store, "digits", "1", reason="first release")
say(
    f"saved {m3.ref} (looks fine offline, fails under traffic); stages: {stages.stages(store, 'digits')}"
)

section("2. Start a server with version 1 in production")
port = 8700 + random.randrange(200)
server = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "torchship",
        "serve",
        "--store",
        str(store.root),
        "--model",
        "digits",
        "--port",
        str(port),
        "--runtime",
        "eager",
        "--max-batch-size",
        "8",
        "--max-delay-ms",
        "1",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
base = f"http://127.0.0.1:{port}"
manage = f"{base}/manage/models/digits"
try:
    for _ in range(600):
        try:
            if requests.get(f"{base}/health/ready", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    say(f"server ready at {base}; the management API is under /manage")

    def send(n: int, users: int = 200, first: int = 0) -> dict[str, dict[str, float]]:
        """n requests of real test digits from `users` users (starting at user `first`);
        per-version tallies."""
        tally: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for i in range(n):
            j = (first + i) % len(data.x_test)
            r = requests.post(
                f"{base}/predict",
                json={"inputs": data.x_test[j].tolist(), "top_k": 1},
                headers={"X-User-ID": f"user-{(first + i) % users}"},
                timeout=30,
            )
            version = r.headers.get("X-Model-Version", "?")
            t = tally[version]
            t["requests"] += 1
            if r.ok:
                t["correct"] += r.json()["predictions"][0]["label"] == str(int(data.y_test[j]))
                t["latency_ms"] += r.json()["latency_ms"]
            else:
                t["errors"] += 1
        return tally

    section("3. A/B test: 50/50, sticky per user (X-User-ID)")
    requests.post(f"{manage}/versions/2/load", timeout=60).raise_for_status()
    requests.put(
        f"{manage}/policy",
        json={"kind": "split", "weights": {"1": 0.5, "2": 0.5}, "reason": "CNN vs MLP"},
        timeout=10,
    ).raise_for_status()
    tally = send(600)
    table(
        "A/B results (same test digits, live traffic)",
        ["version", "requests", "accuracy", "mean latency"],
        [
            [
                v,
                int(t["requests"]),
                f"{t['correct'] / max(1, t['requests'] - t['errors']):.2%}",
                f"{t['latency_ms'] / max(1, t['requests'] - t['errors']):.2f} ms",
            ]
            for v, t in sorted(tally.items())
        ],
    )
    again = {
        requests.post(
            f"{base}/predict",
            json={"inputs": data.x_test[0].tolist()},
            headers={"X-User-ID": "user-7"},
            timeout=30,
        ).headers["X-Model-Version"]
        for _ in range(5)
    }
    say(f"user-7 asked 5 more times and always got version {again}")

    def canary(baseline: str, candidate: str, reason: str) -> None:
        """Start a canary and send traffic in rounds until it completes or rolls back."""
        requests.put(
            f"{manage}/policy",
            timeout=10,
            json={
                "kind": "canary",
                "baseline": baseline,
                "candidate": candidate,
                "steps": [10, 50, 100],
                "advance": "schedule",
                "interval_s": 2,
                "slo": {
                    "max_error_rate_increase": 0.02,
                    "max_p99_ratio": 3.0,
                    "window_s": 60,
                    "min_samples": 20,
                },
                "reason": reason,
            },
        ).raise_for_status()
        for round_ in range(30):  # about a second each: two rounds per step
            began = time.monotonic()
            tally = send(60, users=1000, first=60 * round_)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
            state = requests.get(f"{manage}/policy", timeout=10).json()
            policy = state["policy"]
            where = f"{policy['kind']}" + (
                f" at {state['canary']['percent']}%"
                if policy["kind"] == "canary"
                else f" on v{policy.get('version')}"
            )
            shares = {v: int(t["requests"]) for v, t in sorted(tally.items())}
            errors = int(sum(t["errors"] for t in tally.values()))
            say(f"  round {round_ + 1}: {shares} errors {errors} -> policy {where}")
            if policy["kind"] != "canary":
                break

    section("4. Canaries: a healthy v2, then a broken v3, each guarded by an SLO")
    requests.put(
        f"{manage}/policy", json={"kind": "fixed", "version": "1", "reason": "A/B over"}, timeout=10
    )
    say("v2 (the MLP): the SLO holds, so the canary walks 10% -> 50% -> 100% and completes")
    canary("1", "2", "release v2")
    for record in requests.get(f"{manage}/history", timeout=10).json()["history"][-2:]:
        say(f"[bold]{record.get('kind') or record.get('action')}[/]: {record['reason']}")
    say(f"a completed canary is a promotion: stages now {stages.stages(store, 'digits')}")
    requests.post(f"{manage}/versions/3/load", timeout=60).raise_for_status()
    say("v3 (fails a share of its requests): it breaches the SLO and rolls back by itself")
    canary("2", "3", "release v3")
    last = requests.get(f"{manage}/history", timeout=10).json()["history"][-1]
    say(f"[bold]{last['kind']}[/]: {last['reason']}")

    section("5. Manual rollback and promotion")

    def serving() -> str:
        one = {"inputs": data.x_test[0].tolist()}
        return requests.post(f"{base}/predict", json=one, timeout=30).headers["X-Model-Version"]

    r = requests.post(
        f"{manage}/rollback", json={"reason": "a customer reported a regression"}, timeout=60
    )
    say(f"rollback -> production is now v{r.json()['rolled_back']['to']}, serving {serving()}")
    requests.post(
        f"{manage}/promote",
        json={"version": "2", "reason": "the regression was in the client; v2 is fine"},
        timeout=60,
    ).raise_for_status()
    say(f"promote v2 -> serving {serving()}")
    table(
        "digits: history (store + traffic policy)",
        ["when", "what", "why"],
        [
            [h["at"][11:19], h.get("kind") or h.get("action"), h.get("reason", "")]
            for h in requests.get(f"{manage}/history", timeout=10).json()["history"]
        ],
    )
    say(f"stages now: {stages.stages(store, 'digits')}")
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    say(f"server stopped (exit {server.returncode})")
