"""An export's model_card.md: what the model is, how it was found, its figures, its limits, how to use it."""

from __future__ import annotations

from typing import Any

from pipeline.commands.export_choice import ExportedModel
from pipeline.commands.verify_export import TEST_ROWS
from pipeline.spec.sources import DIGITS, FolderSource
from pipeline.spec.studies import StudySpec
from pipeline.training.latency import EXPORT_RUNS, THROUGHPUT_BATCH


def model_card(spec: StudySpec, chosen: ExportedModel, config: dict[str, Any], metrics: dict[str, Any],
               dataset: str | FolderSource, given_val: bool, cached: bool) -> str:
    """`given_val`: the dataset brought its own val/ split; `cached`: the test split is rows of the image cache
    (the export's test_rows.npy), not IDX files."""
    return "\n".join([
        f"# {spec.name} champion: {config['model']} on {config['dataset']}\n",
        f"{spec.description or ''}\n",
        _what_it_is(config, metrics),
        _how_found(spec, chosen, config, dataset, given_val),
        _figures(spec, chosen, metrics),
        _limits(spec, chosen, config, metrics),
        _use(config, cached),
    ])


def _what_it_is(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    return f"""## What it is
A {config['model']} image classifier for {len(config['classes'])} classes ({', '.join(config['classes'])}), taking
{config['input']}. {metrics['parameter_count']:,} parameters, {metrics['flops_per_image'] / 1e6:,.1f} MFLOPs per image.
Architecture and training parameters: `config.json` (`params`); how a picture becomes the input: `preprocessing`.
"""


def _how_found(spec: StudySpec, chosen: ExportedModel, config: dict[str, Any], dataset: str | FolderSource,
               given_val: bool) -> str:
    definition = chosen.definition
    space = ", ".join(sorted(definition.get("space", {}))) or "none"
    fixed = ", ".join(f"{k}={v}" for k, v in sorted(definition.get("fixed", {}).items())) or "none"
    trained_on = definition.get("train_limit") or "all"
    validation = ("the folder's own val/ split" if given_val else
                  f"a stratified, seeded split of the training images (hash {config['split_hash']})")
    if isinstance(dataset, FolderSource):
        held_out = (f"the pictures in {dataset.path}/test/ when the folder is split into train/ and test/, "
                    f"otherwise a stratified {dataset.test_fraction:.0%} of its pictures carved once with a fixed "
                    "seed; never trained or tuned on")
    else:
        held_out = f"the test split that {config['dataset']} ships with; never trained or tuned on"
    return f"""## How it was found
Optuna study `{chosen.study_name}` (file `studies/{spec.name}.toml`): sampler {definition.get('sampler')}, pruner
{definition.get('pruner')}, up to {definition.get('epochs')} epochs per trial, objective
{', '.join(spec.metrics)}. Searched: {space}. Fixed: {fixed}.
{_which_run(chosen, config)}; source: {chosen.source}.
Training images: {trained_on} of the training split; validation: {validation}, used for every tuning decision.
Test: {held_out}. Dataset digest {config['dataset_checksum']}.
"""


def _figures(spec: StudySpec, chosen: ExportedModel, metrics: dict[str, Any]) -> str:
    per_class = "\n".join(f"| {name} | {accuracy:.4f} |"
                          for name, accuracy in metrics["test_per_class_accuracy"].items())
    test = f"{metrics['test_accuracy']:.4f} ({metrics['test_correct']:,}/{metrics['test_images']:,})"
    return f"""## Figures
| figure | value |
|---|---|
{_seeds_row(chosen, spec)}| validation accuracy of these weights (recorded in training) | {metrics['val_accuracy']} |
| **test accuracy** (untouched test split, measured at export) | **{test}** |
| CPU latency, batch 1 (median of {EXPORT_RUNS}) | {metrics['cpu_latency_ms_batch1_median']:.3f} ms |
| CPU throughput, batch {THROUGHPUT_BATCH} | {metrics['cpu_throughput_images_per_s_batch256']:,.0f} images/s |

CPU figures on {metrics['cpu_threads']} threads of the exporting machine. Per-class test accuracy:

| class | accuracy |
|---|---|
{per_class}

`confusion_matrix.png` and `misclassified.png` show where it errs.
"""


def _limits(spec: StudySpec, chosen: ExportedModel, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    return f"""## Limits
- Trained and tested on {config['dataset']} only: {_looks(config['preprocessing'])}.
  Other pictures must be prepared the same way (`make predict` does) and may still score far lower.
- The test accuracy is one sample of {metrics['test_images']:,} images; differences of a few tenths of a percent
  between models are within noise.
- {_how_chosen(chosen, spec)}; no calibration of the probabilities.
"""


def _use(config: dict[str, Any], cached: bool) -> str:
    return f"""## Use
```python
import torch
model = torch.export.load("model.pt2").module()
probabilities = model(x).softmax(1)   # x: {config['input']}
```
`model.pt2` is a program: loading it unpickles parts of it, which can run code, so load it only from a source
you trust, like any program. `make predict` does not load it: it rebuilds the network from `config.json` and
reads `weights.pt` with `torch.load(..., weights_only=True)`, which builds tensors and nothing else.
{_verify_sentence(config, cached)}
"""


def _verify_sentence(config: dict[str, Any], cached: bool) -> str:
    """How to run verify.py (`cached`: the test split is rows of the image cache)."""
    if not cached:
        return ("`python verify.py --images <t10k-images-idx3-ubyte> --labels <t10k-labels-idx1-ubyte>` re-checks the "
                "test accuracy with torch alone.")
    cache = f"<data>/cache/{config['dataset_checksum']}"
    return (f"`python verify.py --images {cache}/images.npy --labels {cache}/labels.npy --rows {TEST_ROWS}` "
            "(`<data>`: the pipeline's data folder, `data/` unless --root moved it) re-checks the test accuracy with "
            "torch alone.")


def _looks(preprocessing: dict[str, Any]) -> str:
    """What the model's input pictures look like, for the model card."""
    size = preprocessing["image_size"]
    if preprocessing["style"] in DIGITS:
        return f"{size}x{size} grayscale, centred, light object on a dark background"
    colour = "RGB" if preprocessing["channels"] == "rgb" else "grayscale"
    return f"{size}x{size} {colour}, the shorter side resized to {size} and the centre cropped"


def _which_run(chosen: ExportedModel, config: dict[str, Any]) -> str:
    if chosen.confirmed is None:
        return f"This is {chosen.describe()} (seed {config['trial_seed']})"
    return (f"This is {chosen.describe()} (seed {config['trial_seed']}): after the search, the champion phase "
            f"trained the best configurations again over seeds and chose trial {chosen.trial_number}'s by its "
            "mean; these weights are its run closest to that mean, a typical run rather than the luckiest")


def _seeds_row(chosen: ExportedModel, spec: StudySpec) -> str:
    """The configuration's validation mean and interval over seeds: a table row, or nothing without them."""
    if chosen.confirmed is None:
        return ""
    s = chosen.confirmed.summary
    spread = "" if s.std is None else f", 95% CI [{s.ci_low:.4f}, {s.ci_high:.4f}] (Student t), std {s.std:.4f}"
    return (f"| {spec.metrics[0]} of the configuration over {s.n} seeds (validation) | mean {s.mean:.4f}{spread}, "
            f"min {s.low:.4f}, max {s.high:.4f} |\n")


def _how_chosen(chosen: ExportedModel, spec: StudySpec) -> str:
    if chosen.how_chosen:
        return chosen.how_chosen
    if chosen.confirmed is None:
        return "Chosen by validation accuracy among the study's trials"
    return (f"Chosen by its mean {spec.metrics[0]} over {chosen.confirmed.summary.n} seeds among the "
            "search's best configurations; the test split was used for nothing but the figure above")
