"""Re-evaluate an exported model on the test split with torch alone: no project code, no MLflow.

Every export carries a copy of this file as `verify.py`:

    python verify.py --images .../t10k-images-idx3-ubyte --labels .../t10k-labels-idx1-ubyte

It loads `model.pt2` and `config.json` from its own folder, normalises the images exactly as training
did ((x / 255 - mean) / std in float32), classifies them in batches with a fixed thread count, and
prints one JSON line: {"correct": ..., "total": ..., "accuracy": ...}. The export's metrics.json must
match it exactly.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

IDX_DTYPES = {0x08: torch.uint8}


def read_idx(path: Path) -> torch.Tensor:
    """An uncompressed IDX file (the MNIST format) as a uint8 tensor."""
    payload = path.read_bytes()
    zero, dtype, dims = struct.unpack(">HBB", payload[:4])
    if zero != 0 or dtype not in IDX_DTYPES:
        raise ValueError(f"{path}: not an uint8 IDX file")
    shape = struct.unpack(f">{dims}I", payload[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(payload[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def logits(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int) -> torch.Tensor:
    """Class scores of uint8 [N, 28, 28] images, normalised the way training normalised them."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].unsqueeze(1).to(torch.float32).div_(255.0)
            scores.append(model(x.sub_(mean).div_(std)).float())
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
    parser.add_argument("--images", type=Path, required=True, help="the test split's IDX images file")
    parser.add_argument("--labels", type=Path, required=True, help="the test split's IDX labels file")
    parser.add_argument("--export", type=Path, default=here, help="the export folder (default: this file's)")
    args = parser.parse_args()
    config = json.loads((args.export / "config.json").read_text())
    evaluation = config["evaluation"]
    result = evaluate(args.export / "model.pt2", config, read_idx(args.images), read_idx(args.labels),
                      evaluation["threads"], evaluation["batch_size"])
    result["project_code_loaded"] = "pipeline" in sys.modules  # must stay False: torch alone suffices
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
