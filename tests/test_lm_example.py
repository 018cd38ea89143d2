"""examples/lm.py on a tiny budget: it trains, its loss falls, it validates every K steps (by default ceil(steps / 4)),
and it prints bits per byte next to gzip and xz."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def test_lm_example_trains_and_prints_bits_per_byte(tmp_path):
    out = tmp_path / "lm"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "examples" / "lm.py"), "--steps", str(STEPS), "--out", str(out),
           "--layers", "1", "--dim", "32", "--heads", "2", "--ctx", "32", "--bs", "16", "--lr", "1e-2",
           "--valid-bytes", "4096", "--threads", "1", "--average", "1"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout

    first, last = map(float, re.search(r"train loss .*: first \d+ steps ([\d.]+) -> last \d+ steps ([\d.]+)",
                                       text).groups())
    assert last < first - 0.5, text  # from ~ln 256 = 5.5 nats towards the byte statistics of Python source
    assert re.search(rf"steps: {STEPS} in ", text), text
    # valid_every defaults to ceil(steps / 4): validations after steps 10, 20, 30 and 40 (the end), in bits per byte
    rows = re.search(r"^validations \(bits per byte\): (.*)$", text, re.MULTILINE).group(1)
    valid = [(int(i), float(v)) for i, v in re.findall(r"step (\d+): train [\d.]+ valid ([\d.]+)", rows)]
    assert [i for i, _ in valid] == [10, 20, 30, 40], text
    assert valid[-1][1] < valid[0][1], text

    bpb = {name: float(v) for name, v in re.findall(r"^  (model, last weights|model, average of last \d+ ckpts|"
                                                     r"gzip -9|xz -9e)\s+([\d.]+)$", text, re.MULTILINE)}
    assert set(bpb) == {"model, last weights", "model, average of last 1 ckpts", "gzip -9", "xz -9e"}, text
    assert all(0 < v < 9 and math.isfinite(v) for v in bpb.values()), bpb
    # the newest checkpoint is the one at the last step: the "average" of the last one is the last weights (timed
    # checkpoints may come before it on a slow machine: the run is ~1 s and they are due every 0.6 s at the least)
    assert bpb["model, average of last 1 ckpts"] == bpb["model, last weights"]

    assert (out / "loss.png").stat().st_size > 0
    # the newest checkpoint is at the last step (written after that step's validation, as the end of the fit's
    # only epoch); with --average 1 only it is kept
    assert [p.name for p in (out / "checkpoints").glob("ckpt-*.pt")] in ([f"ckpt-{STEPS:08d}.pt"],
                                                                          [f"ckpt-{STEPS:08d}-epoch-0.pt"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(STEPS))
    for tag in ("valid_loss", "bits_per_byte"):
        assert [e.step for e in events.Scalars(tag)] == [10, 20, 30, 40], tag
    # the last row is the last weights' evaluation: the number printed for them
    assert round(events.Scalars("bits_per_byte")[-1].value, 3) == bpb["model, last weights"]
