"""Re-evaluate an exported model on the test split with torch alone: no project code, no MLflow.

Every export carries a copy of this file as `verify.py`. The test split comes either as IDX files
(MNIST, Fashion-MNIST) or as the decoded-image cache's `.npy` files plus the export's `test_rows.npy`,
which says which rows of the cache are the test split (CIFAR, your own folders):

    python verify.py --images .../t10k-images-idx3-ubyte --labels .../t10k-labels-idx1-ubyte
    python verify.py --images data/cache/<digest>/images.npy --labels data/cache/<digest>/labels.npy \\
                     --rows test_rows.npy

It loads `model.pt2` and `config.json` from its own folder, normalises the images exactly as training
did ((x / 255 - mean) / std in float32, per channel), classifies them in batches with a fixed thread
count, and prints one JSON line: {"correct": ..., "total": ..., "accuracy": ...}. The export's
metrics.json must match it exactly. Reading `.npy` files needs numpy (torch usually brings it along).
Loading model.pt2 unpickles parts of it: it is a program, so run this on exports you trust (export-best
runs it on the one it has just written).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

IDX_DTYPES = {0x08: torch.uint8}
EVAL_BATCH = 1000  # images per forward pass when an export is scored (export-best, predict)
TEST_ROWS = "test_rows.npy"  # written for datasets read from the image cache: the test split's rows of it


def read_idx(path: Path) -> torch.Tensor:
    """An uncompressed IDX file (the MNIST format) as a uint8 tensor."""
    payload = path.read_bytes()
    zero, dtype, dims = struct.unpack(">HBB", payload[:4])
    if zero != 0 or dtype not in IDX_DTYPES:
        raise ValueError(f"{path}: not an uint8 IDX file")
    shape = struct.unpack(f">{dims}I", payload[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(payload[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def read_npy(path: Path, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A `.npy` file (no pickled objects) as a tensor; with `rows`, only those rows are read (memory-mapped)."""
    try:
        import numpy as np
    except ImportError:
        raise SystemExit(f"{path}: reading .npy files needs numpy; pip install numpy") from None
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if rows is not None:
        array = array[rows.numpy()]
    return torch.from_numpy(np.ascontiguousarray(array))


def read_array(path: Path, rows: torch.Tensor | None = None) -> torch.Tensor:
    """An IDX or `.npy` file (chosen by the suffix), optionally only the given rows."""
    if path.suffix == ".npy":
        return read_npy(path, rows)
    array = read_idx(path)
    return array if rows is None else array[rows]


def _per_channel(value: float | list[float]) -> float | torch.Tensor:
    """One channel: a plain float (the arithmetic training used); several: a [1, C, 1, 1] tensor."""
    values = value if isinstance(value, list | tuple) else [value]
    if len(values) == 1:
        return float(values[0])
    return torch.tensor(values).view(1, -1, 1, 1)


def logits(model: torch.nn.Module, images: torch.Tensor, mean: float | list[float], std: float | list[float],
           batch_size: int) -> torch.Tensor:
    """Class scores of uint8 [N, C, H, W] (or [N, H, W]) images, normalised the way training normalised them.

    `mean` and `std` are one value per channel (exports before per-channel statistics recorded a scalar).
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    shift, scale = _per_channel(mean), _per_channel(std)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(torch.float32).div_(255.0)
            scores.append(model(x.sub_(shift).div_(scale)).float())
    return torch.cat(scores)


def evaluate(model_path: Path, config: dict, images: torch.Tensor, labels: torch.Tensor,
             threads: int, batch_size: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    model = torch.export.load(str(model_path)).module()
    predicted = logits(model, images, config["mean"], config["std"], batch_size).argmax(1)
    correct = int((predicted == labels.long()).sum())
    return {"correct": correct, "total": len(images), "accuracy": correct / len(images)}


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="the test images: an IDX file or a .npy file")
    parser.add_argument("--labels", type=Path, required=True, help="the test labels: an IDX file or a .npy file")
    parser.add_argument("--rows", type=Path, default=None,
                        help="a .npy of int64 row numbers: the test split's rows of --images/--labels")
    parser.add_argument("--export", type=Path, default=here, help="the export folder (default: this file's)")
    args = parser.parse_args()
    config = json.loads((args.export / "config.json").read_text())
    rows = read_npy(args.rows).long() if args.rows is not None else None
    images, labels = read_array(args.images, rows), read_array(args.labels, rows)
    expected = config.get("input_shape")
    shape = list(images.shape[1:]) if images.dim() == 4 else [1, *images.shape[1:]]
    if expected is not None and shape != expected:
        raise SystemExit(f"{args.images}: images are {shape}, the model takes {expected}; pass the export's test split")
    evaluation = config["evaluation"]
    result = evaluate(args.export / "model.pt2", config, images, labels, evaluation["threads"],
                      evaluation["batch_size"])
    result["project_code_loaded"] = "pipeline" in sys.modules  # must stay False: torch alone suffices
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
