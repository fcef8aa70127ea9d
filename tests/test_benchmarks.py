"""The benchmarks are run by hand (make bench-*), not by the suite: each must at least load and read its
arguments, so an API it calls that moved away is found here, not on the day someone measures."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from pipeline.spec.paths import PROJECT_ROOT

BENCHMARKS = sorted(p for p in (PROJECT_ROOT / "benchmarks").glob("*.py") if p.stem != "reference_loop")


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_each_benchmark_loads_and_reads_its_arguments(script: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` has it: its siblings import
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_trainer_profile_splits_a_step_into_its_parts(tiny_dataset, monkeypatch, capsys):
    """`make bench-trainer PROFILE=n`: every part of a bf16 step gets its ms and share; the shares make the whole."""
    from pipeline.data import loading

    _, root = tiny_dataset
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    bench = runpy.run_path(str(PROJECT_ROOT / "benchmarks" / "trainer_vs_baseline.py"))
    bench["profile_step"](loading.prepare("tiny", root, val_size=100), 3)
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        name, numbers = line[:24].strip(), line[24:].split()
        rows[name] = (float(numbers[0]), float(numbers[2].rstrip("%")) if len(numbers) > 2 else None)
    assert set(rows) == {name for name, _ in bench["STEP_PARTS"]} | {"the rest", "all"}
    assert rows["convolution forward"][0] > 0 and rows["convolution backward"][0] > 0 and rows["optimizer"][0] > 0
    assert sum(share for _, share in rows.values() if share is not None) == pytest.approx(100, abs=0.5)
    assert sum(ms for name, (ms, _) in rows.items() if name != "all") == pytest.approx(rows["all"][0], rel=0.02)


def test_the_fused_batchnorm_relu_kernel_computes_what_torchs_ops_compute(monkeypatch):
    """`make bench-fusion` times a C++ kernel against BatchNorm2d + ReLU: its figures mean something only if the
    kernel computes the same thing: outputs and gradients within bf16 rounding, the same running statistics,
    NaN kept, torch's own ops in evaluation, and the network's parameters untouched by the swap."""
    import torch
    from torch import nn

    from pipeline.spec import hparams
    from pipeline.training import models

    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    bench = runpy.run_path(str(PROJECT_ROOT / "benchmarks" / "fused_bn_relu.py"))
    fused_class = bench["fused_bn_relu_class"](bench["build_kernel"]())

    pair = bench["PairRun"].run((4, 16, 6, 6), fused_class)
    relative, norm, fused = bench["relative_difference"], pair.norm, pair.fused
    assert (pair.y_fused == 0).any() and (pair.y_fused > 0).any()  # ReLU cut some values and passed others
    assert relative(pair.y_fused, pair.y_torch) <= 2**-7  # a bf16 step
    assert relative(pair.ours.grad, pair.theirs.grad) <= 2**-6
    assert relative(fused.norm.weight.grad, norm.weight.grad) < 1e-3
    assert relative(fused.norm.bias.grad, norm.bias.grad) < 1e-3
    torch.testing.assert_close(fused.norm.running_mean, norm.running_mean)
    torch.testing.assert_close(fused.norm.running_var, norm.running_var)
    assert fused.norm.num_batches_tracked == norm.num_batches_tracked == 1

    x = pair.x
    fused.eval()
    norm.eval()
    assert torch.equal(fused(x), torch.relu(norm(x)))  # evaluation: torch's ops, the running statistics
    fused.train()
    poisoned = x.clone()
    poisoned[0, 3, 0, 0] = float("nan")
    assert fused(poisoned)[:, 3].isnan().all()  # a diverged step stays visible, as torch's ReLU keeps NaN

    model = models.build_model(hparams.CLASSIC["cnn"])
    swapped = bench["with_fused_pairs"](model, fused_class)
    assert sum(isinstance(m, fused_class) for m in swapped) == 4
    assert sum(isinstance(m, nn.ReLU) for m in swapped) == 1  # the head's, which no BatchNorm precedes
    assert [id(p) for p in swapped.parameters()] == [id(p) for p in model.parameters()]


def test_the_rung_table_ranks_rules_against_full_fidelity(tmp_path, monkeypatch, capsys):
    """`benchmarks/rung_correlation.py --table`: Spearman's rho with ties as average ranks, the top-third hits, and a
    row per rule from the recorded runs (a rule missing for some configuration is left out)."""
    import json

    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    bench = runpy.run_path(str(PROJECT_ROOT / "benchmarks" / "rung_correlation.py"))
    spearman, top_hits = bench["spearman"], bench["top_hits"]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # ranks 0.5, 0.5, 2 against 0, 1, 2
    assert top_hits([0.1, 0.9, 0.8, 0.2, 0.3, 0.7], [0.6, 0.5, 0.9, 0.1, 0.8, 0.2], keep=2) == 1  # keeps 1, 2

    path = tmp_path / "runs.jsonl"
    rows = []
    for config, (full, cheap) in enumerate([(0.99, 0.95), (0.98, 0.96), (0.97, 0.94)]):
        rows.append({"dataset": "mnist", "config": config, "rung": "full", "best": full,
                     "history": [cheap - 0.1, cheap, full, full, full]})
        rows.append({"dataset": "mnist", "config": config, "rung": "1/8 x 1", "best": cheap, "history": [cheap]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench["table"]([path])
    out = capsys.readouterr().out
    assert "| complete run, 1/8 x 1 | 0.03 | +0.50 (3 configs) |" in out
    assert "| epoch 3 of the full run | 0.60 | +1.00 (3 configs) |" in out
    assert "1/4 x 2" not in out  # no such runs recorded


def test_the_rung_table_ranks_the_ladder_as_a_planned_search_does(monkeypatch):
    """The ladder row: rung 0's best third, ranked by rung 1, above the rest (ranked by rung 0)."""
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    bench = runpy.run_path(str(PROJECT_ROOT / "benchmarks" / "rung_correlation.py"))
    low = {0: 0.90, 1: 0.95, 2: 0.80, 3: 0.97, 4: 0.85, 5: 0.70}
    high = {0: 0.99, 1: 0.96, 2: 0.999, 3: 0.98, 4: 0.90, 5: 0.91}
    ranked = bench["ladder"](low, high, keep=2)  # rung 0 keeps 3 and 1; rung 1 puts 3 first
    assert sorted(ranked, key=lambda c: -ranked[c]) == [3, 1, 0, 4, 2, 5]
