"""Optional cross-check of fp4cal's local-Hessian picks against NVIDIA ModelOpt's scale sweep (GPU only).

Runs only when the model is on CUDA and ModelOpt's sweep module imports; otherwise it says why not. Each linear
weight that local_hessian searched is swept by ModelOpt with the same weight, global amax and calibration
Hessian; picks are compared as FP8 block-scale codes (fp4cal.search.parity.compare_picks), and a differing
pick whose float64 losses are equal (within 1e-6 relative) counts as a tie.
"""

from __future__ import annotations

from fp4cal.calib.capture import CaptureStats
from fp4cal.calib.result import CalibrationResult
from fp4cal.calib.targets import Target
from fp4cal.search.parity import compare_picks


def modelopt_cross_check(targets: list[Target], stats: CaptureStats, result: CalibrationResult) -> dict:
    """{'status': 'ran', 'layers', 'blocks', 'differing', 'ties', 'worst_rel_gap', 'version'} or
    {'status': 'not run: <why>'}. Never raises: a failure is reported in 'status'."""
    todo = [t for t in targets if t.kind == "linear" and result.weights[t.name].method == "local_hessian"]
    if not todo:
        return {"status": "not run: no linear weight was searched with local_hessian"}
    if not todo[0].weight().is_cuda:
        return {"status": "not run: ModelOpt's sweep is a CUDA kernel and the model is not on CUDA"}
    try:
        import modelopt
        from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_sweep as mo
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return {"status": f"not run: ModelOpt is not importable ({type(e).__name__}: {e})"}
    out = {"status": "ran", "version": getattr(modelopt, "__version__", "?"), "layers": 0, "blocks": 0,
           "differing": 0, "ties": 0, "worst_rel_gap": 0.0}
    try:
        for t in todo:
            wr = result.weights[t.name]
            w = t.weight()
            h = stats.inputs[t.module_name].hessian.normalized()
            theirs = mo.nvfp4_fp8_scale_sweep_hessian(w.reshape(-1, 16), wr.global_amax, h, block_size=16)
            rep = compare_picks(w, wr.global_amax, wr.block_amax, theirs.float().reshape(wr.block_amax.shape), h)
            out["layers"] += 1
            out["blocks"] += rep.blocks
            out["differing"] += rep.differing
            out["ties"] += rep.ties
            out["worst_rel_gap"] = max(out["worst_rel_gap"], rep.worst_rel_gap)
    except Exception as e:  # noqa: BLE001 - an API mismatch must not sink the evaluation
        return {"status": f"failed after {out['layers']} layers ({type(e).__name__}: {e})"}
    return out
