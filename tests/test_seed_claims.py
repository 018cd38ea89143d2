"""benchmarks/seed_claims.py end to end on its smallest configuration: structure and sanity, no timings."""
import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("seed_claims", REPO / "benchmarks" / "seed_claims.py")
seed_claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_claims)

TINY_LM = {"layers": 1, "dim": 32, "heads": 2, "ctx": 32, "bs": 16, "lr": 1e-2}


def test_checkpoint_averaging_claim_runs(capsys):
    results = seed_claims.averaging_claim([0], steps=40, lm=TINY_LM, valid_bytes=4096)
    assert set(results) == {"cosine", "constant"}
    for runs in results.values():
        (last, averaged), = runs
        assert set(averaged) == {1, 2, 5, 10}
        assert all(math.isfinite(v) and 0 < v < 9 for v in [last, *averaged.values()])
        # the last checkpoint is the last step's weights: "averaging" it alone gives the fit's last validation
        assert averaged[1] == last
    seed_claims.print_averaging(results)
    assert "average of last 10" in capsys.readouterr().out


def test_legw_claim_runs(capsys):
    results = seed_claims.legw_claim([0], [100], base_bs=32, lrs=[3e-3], epochs=3, warmup_epochs=0.25, ks=(4,))
    names = [name for name, _, _ in results]
    assert len(names) == 4 and names[0].startswith("batch 32, tuned lr 0.003")
    assert [n.split(",")[1].strip()[:3] for n in names[1:]] == ["(a)", "(b)", "(c)"]
    # LEGW at k = 4: lr × 2, the warmup keeps its steps (11 at batch 32, a quarter of its 44 steps an epoch; 3 epochs at batch 128 are 33 steps)
    assert "lr 0.006" in names[3] and "(11/33 warmup steps)" in names[3], names[3]
    for _, losses, accuracies in results:
        assert all(0 < v < 3 for v in losses) and all(0 <= a <= 1 for a in accuracies)
    assert results[0][2][0] > 0.5  # the small batch learns digits in 3 epochs
    seed_claims.print_legw(results)
    assert "valid loss" in capsys.readouterr().out
