"""check_checkpoint(): what a serving engine's loader will reject, or load wrongly, in an NVFP4 checkpoint.

Reads a compressed-tensors (``nvfp4-pack-quantized``) or Model Optimizer NVFP4 checkpoint directory, written
by fp4cal or by anyone, and returns one Finding per violation, per tensor (or config field), for the engines
asked about. Each rule names the loader file it comes from (docs/export.md lists them): "error" findings are
checkpoints the engine refuses or serves wrong (NaN / inf / mis-scaled weights); "warning" findings are
version-dependent or accuracy-only. Nothing is imported from the engines: the rules are written from reading
their loaders, so the check runs anywhere (CPU, no engine installed).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fp4cal.export import compressed_tensors as ct_format
from fp4cal.export import modelopt as mo_format
from fp4cal.export.io import CheckpointError, checkpoint_files, open_shard, read_json
from fp4cal.validation import BLOCK

ENGINES = ("vllm", "sglang", "tensorrt-llm", "transformers")
SERVING = ("vllm", "sglang")

# Where each rule comes from (file paths in the engines' repositories; see docs/export.md).
SOURCES = {
    "ct-scheme": "vllm: model_executor/layers/quantization/compressed_tensors/compressed_tensors.py "
                 "(_is_fp4a4_nvfp4 / _is_fp4a16_nvfp4)",
    "ct-tensors": "vllm: compressed_tensors/schemes/compressed_tensors_w4a{4,16}_nvfp4.py (create_weights)",
    "mo-config": "vllm / sglang: quantization/modelopt.py (ModelOptNvFp4Config.from_config, QUANT_ALGOS)",
    "mo-tensors": "vllm: quantization/modelopt.py (ModelOptNvFp4LinearMethod.create_weights); "
                  "tensorrt-llm: _torch/modules/linear.py (NVFP4LinearMethod.load_weight_scales)",
    "fused": "vllm: process_weights_after_loading takes max() over fused partitions (warns); "
             "tensorrt-llm: load_weight_scales asserts equal weight_scale_2 / input_scale",
    "ignore": "vllm: compressed_tensors.py / modelopt.py is_layer_excluded (ignore / exclude_modules)",
    "ignore-dense": "as 'ignore'; Linear-like is judged from the tensor name (a heuristic for foreign checkpoints)",
    "router": "vllm: models/*_moe.py build the router gate with quant_config=None",
    "trtllm-format": "tensorrt-llm: _torch/modules/linear.py reads ModelOpt names (weight_scale_2, input_scale)",
    "transformers-moe": "transformers 5.x compressed-tensors MoE load drops per-expert weight_global_scale "
                        "(huggingface/transformers#48371)",
    "transformers-dtype": "transformers 5.x + compressed-tensors decompress fused experts to bfloat16",
    "transformers-modelopt": "transformers has no ModelOpt NVFP4 quantizer",
    "values": "dequantization = E2M1 * v * s_g (ModelOpt) or E2M1 * v / gs (compressed-tensors)",
}


@dataclass(frozen=True)
class Finding:
    """One violation. severity: "error" (refused, or served as NaN / inf / wrongly scaled weights) or "warning".
    engines: the engines it applies to. where: a tensor name, a module, or a file / config field."""

    severity: str
    engines: tuple[str, ...]
    where: str
    message: str
    rule: str

    def line(self) -> str:
        return f"{self.severity:<7}  {','.join(self.engines):<32}  {self.where}: {self.message}"


class _Report:
    def __init__(self, engines: tuple[str, ...]):
        self.engines = engines
        self.findings: list[Finding] = []

    def add(self, severity: str, engines, where: str, message: str, rule: str) -> None:
        hit = tuple(e for e in ENGINES if e in engines and e in self.engines)
        if hit:
            self.findings.append(Finding(severity, hit, where, message, rule))


_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _Lazy:
    """A checkpoint's tensor names, dtypes and shapes from the shard headers; values read only when asked (the
    check reads scales, never the packed codes of a large model)."""

    def __init__(self, d: Path):
        self.info: dict[str, tuple[Path, torch.dtype | None, tuple[int, ...]]] = {}
        # one open handle per shard: opening parses the shard's whole JSON header, which for an MoE shard lists
        # ~10^4 tensors; reopened per tensor read, the check of an 8-layer 128-expert model took over a minute
        self._open: dict[Path, object] = {}
        for path in checkpoint_files(d):
            with open_shard(path) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.info[name] = (path, _ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def __iter__(self):
        return iter(self.info)

    def dtype(self, name: str):
        return self.info[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][2]

    def get(self, name: str) -> torch.Tensor:
        path = self.info[name][0]
        try:
            f = self._open.get(path)
            if f is None:
                f = self._open[path] = open_shard(path)
            return f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); the file is truncated or "
                                  "corrupt") from None


def _format_of(d: Path, config: dict):
    if ct_format.detect(config):
        return ct_format
    if mo_format.detect(config) or (d / mo_format.HF_QUANT_CONFIG).exists():
        return mo_format
    return None


def _check_ct_config(q: dict, r: _Report) -> bool:
    """compressed-tensors quantization_config: every config group must be the NVFP4 scheme vLLM recognises.
    Returns whether activations are quantized (W4A4)."""
    if q.get("format") != ct_format.FORMAT:
        r.add("error", ENGINES, "config.json quantization_config.format",
              f"is {q.get('format')!r}; expected {ct_format.FORMAT!r}", "ct-scheme")
    groups = q.get("config_groups") or {}
    if not groups:
        r.add("error", ENGINES, "config.json quantization_config.config_groups", "is empty; expected an NVFP4 "
              "group (weights: num_bits 4, type float, strategy tensor_group, group_size 16, symmetric)", "ct-scheme")
    w4a4 = False
    want = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
    for gname, g in groups.items():
        for part in ("weights", "input_activations"):
            args = (g or {}).get(part)
            if args is None:
                if part == "weights":
                    r.add("error", ENGINES, f"config_groups.{gname}.weights", "is missing", "ct-scheme")
                continue
            w4a4 |= part == "input_activations"
            for key, value in want.items():
                if args.get(key) != value:
                    r.add("error", ENGINES, f"config_groups.{gname}.{part}.{key}",
                          f"is {args.get(key)!r}; the NVFP4 scheme needs {value!r}", "ct-scheme")
        if not (g or {}).get("targets"):
            r.add("error", ENGINES, f"config_groups.{gname}.targets", "is empty; expected e.g. ['Linear']", "ct-scheme")
    return w4a4


def _check_mo_config(d: Path, config: dict, r: _Report) -> bool:
    """ModelOpt hf_quant_config.json and config.json: quant_algo and the fields vLLM / SGLang require.
    Returns whether activations are quantized (quant_algo NVFP4)."""
    algos = {}
    hq_path = d / mo_format.HF_QUANT_CONFIG
    if hq_path.exists():
        try:
            hq = read_json(hq_path).get("quantization")
        except (ValueError, AttributeError) as e:
            r.add("error", ENGINES, mo_format.HF_QUANT_CONFIG, f"is not valid JSON ({e})", "mo-config")
            hq = None
        if not isinstance(hq, dict):
            r.add("error", ENGINES, mo_format.HF_QUANT_CONFIG, "has no 'quantization' object", "mo-config")
        else:
            algos[mo_format.HF_QUANT_CONFIG] = str(hq.get("quant_algo", "")).upper()
            missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in hq]
            if missing:
                r.add("error", SERVING, f"{mo_format.HF_QUANT_CONFIG} quantization",
                      f"lacks {missing}; vLLM and SGLang require group_size, kv_cache_quant_algo and "
                      "exclude_modules for NVFP4", "mo-config")
            if hq.get("group_size", 16) != 16:
                r.add("error", ENGINES, f"{mo_format.HF_QUANT_CONFIG} group_size",
                      f"is {hq.get('group_size')!r}; NVFP4 needs 16", "mo-config")
    q = config.get("quantization_config")
    if isinstance(q, dict) and mo_format.detect(config):
        algos["config.json"] = str(q.get("quant_algo", "")).upper()
    if not algos:
        r.add("error", ENGINES, "config.json", "has no ModelOpt quant_algo (nor hf_quant_config.json)", "mo-config")
        return False
    if len(set(algos.values())) > 1:
        r.add("error", ENGINES, "quant_algo", f"differs between files: {algos}", "mo-config")
    algo = next(iter(algos.values()))
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        r.add("error", ENGINES, "quant_algo", f"is {algo!r}; expected 'NVFP4' (W4A4) or 'W4A16_NVFP4'", "mo-config")
    if algo == "W4A16_NVFP4":
        r.add("warning", ("tensorrt-llm",), "quant_algo", "W4A16_NVFP4: TensorRT-LLM's NVFP4LinearMethod computes "
              "alpha from input_scale; weight-only NVFP4 was not found in the loader read", "mo-tensors")
    return algo == "NVFP4"


def _ignore_patterns(d: Path, config: dict, fmt) -> list[str]:
    q = config.get("quantization_config") or {}
    pats = list(q.get("ignore") or [])
    if fmt is mo_format and (d / mo_format.HF_QUANT_CONFIG).exists():
        try:
            pats += list((read_json(d / mo_format.HF_QUANT_CONFIG).get("quantization") or {}).get("exclude_modules")
                         or [])
        except (ValueError, AttributeError):
            pass
    return pats


def _ignored(module: str, patterns: list[str]) -> bool:
    """compressed-tensors: exact names and 're:' regexes; ModelOpt: exact names, wildcards and substrings."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif module == p or fnmatch.fnmatchcase(module, p) or module.endswith("." + p):
            return True
    return False


_NOT_LINEAR = re.compile(r"embed|norm|wte|wpe|position|ln_|layernorm|rotary|conv", re.IGNORECASE)
_ROUTER = re.compile(r"(\.mlp\.gate|\.router|\.block_sparse_moe\.gate)$")
_FUSED = (re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), re.compile(r"^(.*)\.(gate_proj|up_proj|w1|w3)$"))
_EXPERT = re.compile(r"\.experts\.\d+\.")


def _scalar(t: torch.Tensor) -> float | None:
    return float(t.float().reshape(-1)[0]) if t.numel() == 1 else None


def _check_module(ck: _Lazy, fmt, m: str, w4a4: bool, r: _Report) -> tuple[float | None, float | None]:
    """Tensors, dtypes, shapes and scale values of one quantized module; returns (global, input) scale values."""
    rule = "ct-tensors" if fmt is ct_format else "mo-tensors"
    names = {k: f"{m}.{getattr(fmt, k)}" for k in ("CODES", "BLOCK_SCALE", "GLOBAL_SCALE", "INPUT_SCALE")}
    need = ("CODES", "BLOCK_SCALE", "GLOBAL_SCALE")
    for k in need:
        if names[k] not in ck:
            r.add("error", ENGINES, names[k], f"is missing (module {m} has "
                  f"{[n for n in names.values() if n in ck]})", rule)
    if any(names[k] not in ck for k in need):
        return None, None
    cshape, vshape = ck.shape(names["CODES"]), ck.shape(names["BLOCK_SCALE"])
    if ck.dtype(names["CODES"]) != torch.uint8 or len(cshape) != 2:
        r.add("error", ENGINES, names["CODES"], f"is {ck.dtype(names['CODES'])} {cshape}; expected uint8 "
              "[out, in/2] (two E2M1 codes per byte)", rule)
        return None, None
    cout, cin = cshape[0], cshape[1] * 2
    if cin % BLOCK:
        r.add("error", ENGINES, names["CODES"], f"in = {cin} is not a multiple of 16", rule)
    if ck.dtype(names["BLOCK_SCALE"]) != torch.float8_e4m3fn or vshape != (cout, cin // BLOCK):
        r.add("error", ENGINES, names["BLOCK_SCALE"], f"is {ck.dtype(names['BLOCK_SCALE'])} {vshape}; expected "
              f"float8_e4m3fn [{cout}, {cin // BLOCK}]", rule)
    else:
        # NaN in E4M3 is S.1111.111: counted on the bytes (an fp32 copy per module made this check slow)
        nan = int(((ck.get(names["BLOCK_SCALE"]).view(torch.uint8) & 0x7F) == 0x7F).sum())
        if nan:
            r.add("error", ENGINES, names["BLOCK_SCALE"], f"has {nan} NaN FP8 code(s): those blocks dequantize "
                  "to NaN", "values")
    gs = ck.get(names["GLOBAL_SCALE"])
    g = _scalar(gs) if gs.is_floating_point() else None
    if g is None or tuple(gs.shape) not in fmt.GLOBAL_SHAPES:
        r.add("error", ENGINES, names["GLOBAL_SCALE"], f"is {gs.dtype} {tuple(gs.shape)}; expected one float32 "
              f"value ({' or '.join(str(list(s)) for s in fmt.GLOBAL_SHAPES)})", rule)
    elif gs.dtype != torch.float32:
        r.add("warning", ENGINES, names["GLOBAL_SCALE"], f"is {gs.dtype}; engines allocate float32", rule)
    if g is not None:
        zero_bad = g == 0 and (fmt.GLOBAL_IS_RECIPROCAL or bool((ck.get(names["CODES"]) & 0x77).any()))
        if not torch.isfinite(torch.tensor(g)) or g < 0 or zero_bad:
            r.add("error", ENGINES, names["GLOBAL_SCALE"], f"is {g}; expected finite and > 0 (the module would "
                  "dequantize to inf / NaN / zeros)", "values")
    a = None
    if names["INPUT_SCALE"] in ck:
        it = ck.get(names["INPUT_SCALE"])
        a = _scalar(it) if it.is_floating_point() else None
        if a is None or not torch.isfinite(torch.tensor(a)) or a <= 0:
            r.add("error", ENGINES, names["INPUT_SCALE"], f"is {it.flatten()[:4].tolist()}; expected one finite "
                  "value > 0 (activations would quantize to inf / NaN)", "values")
            a = None
    elif w4a4:
        expert = " (an expert that saw no calibration token still needs one)" if _EXPERT.search(m + ".") else ""
        r.add("error", ("vllm", "sglang", "tensorrt-llm"), names["INPUT_SCALE"], "is missing but the checkpoint "
              f"quantizes activations (W4A4): the engine's input scale stays uninitialized{expert}", rule)
    return g, a


def check_checkpoint(path: str | os.PathLike, engines: str | tuple[str, ...] | None = None) -> list[Finding]:
    """Every violation of what the engines' loaders require, in the checkpoint directory ``path``.

    engines: one of ENGINES, a tuple of them, or None (all). Raises FileNotFoundError / CheckpointError when
    the directory cannot be read at all (those are reported by load() with the same messages).
    """
    if engines is None:
        engines = ENGINES
    elif isinstance(engines, str):
        engines = (engines,)
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"engine must be one of {ENGINES}, got {bad[0]!r}")
    r = _Report(tuple(engines))
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    try:
        config = read_json(d / "config.json") if (d / "config.json").exists() else {}
    except ValueError as e:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    fmt = _format_of(d, config)
    if fmt is None:
        r.add("error", ENGINES, "config.json", "has no compressed-tensors or ModelOpt NVFP4 quantization_config "
              "(and there is no hf_quant_config.json)", "ct-scheme")
        return r.findings
    if fmt is ct_format:
        w4a4 = _check_ct_config(config["quantization_config"], r)
        r.add("error", ("tensorrt-llm",), "format", "compressed-tensors checkpoint: TensorRT-LLM's NVFP4 loader "
              "reads ModelOpt names (weight, weight_scale, weight_scale_2, input_scale); export with "
              "format='modelopt'", "trtllm-format")
    else:
        w4a4 = _check_mo_config(d, config, r)
        r.add("error", ("transformers",), "format", "ModelOpt checkpoint: transformers has no ModelOpt NVFP4 "
              "loader; use format='compressed-tensors' (or fp4cal.load)", "transformers-modelopt")
    ck = _Lazy(d)
    patterns = _ignore_patterns(d, config, fmt)
    modules = fmt.quantized_modules(ck.info)
    scales = {m: _check_module(ck, fmt, m, w4a4, r) for m in modules}

    for m in modules:
        if _ignored(m, patterns):
            r.add("error", SERVING, m, "is quantized but listed in the ignore / exclude list: the engine builds "
                  "it unquantized and finds no dense weight", "ignore")
        if _ROUTER.search(m):
            r.add("error", SERVING, m, "is an MoE router stored quantized; vLLM / SGLang MoE models build the "
                  "router with quant_config=None and expect a dense weight", "router")
        if m.endswith("lm_head"):
            r.add("warning", ENGINES, m, "lm_head is quantized: supported by recent vLLM ModelOpt loaders only; "
                  "other engines and versions expect a dense lm_head", "ignore")
    quantized = set(modules)
    for name in ck:
        mod, dtype = name.rsplit(".", 1)[0], ck.dtype(name)
        if (name.endswith(".weight") and len(ck.shape(name)) == 2 and dtype in (torch.float16, torch.bfloat16,
                torch.float32) and mod not in quantized and not _NOT_LINEAR.search(name)
                and not _ignored(mod, patterns)):
            # A heuristic on foreign checkpoints (names, not module types): rule "ignore-dense".
            r.add("error", SERVING + ("transformers",) if fmt is ct_format else SERVING, mod,
                  f"is a dense {ck.shape(name)} Linear-like weight missing from the ignore list: the engine "
                  "quantizes every targeted Linear not ignored and would look for its NVFP4 tensors", "ignore-dense")

    groups: dict[str, list[str]] = {}
    for m in modules:
        for i, pat in enumerate(_FUSED):
            hit = pat.match(m)
            if hit:
                groups.setdefault(f"{hit.group(1)}.{('qkv', 'gate_up')[i]}", []).append(m)
    for group, members in sorted(groups.items()):
        gvals = {m: scales[m][0] for m in members if scales[m][0] is not None}
        if len(set(gvals.values())) > 1:
            r.add("error", ("vllm", "sglang", "tensorrt-llm"), group, f"members have different global scales "
                  f"{gvals}: engines fuse them into one GEMM with one global scale (vLLM takes the max and "
                  "mis-scales the others; TensorRT-LLM asserts)", "fused")
        avals = {m: scales[m][1] for m in members if scales[m][1] is not None}
        if len(set(avals.values())) > 1:
            r.add("error", ("tensorrt-llm",), group, f"members have different input scales {avals} "
                  "(TensorRT-LLM asserts they are equal)", "fused")

    experts = [m for m in modules if _EXPERT.search(m + ".")]
    if experts and fmt is ct_format:
        import transformers

        r.add("error", ("transformers",), "experts", f"{len(experts)} expert modules: transformers "
              f"{transformers.__version__} loads compressed-tensors MoE experts with their per-expert "
              "weight_global_scale dropped (huggingface/transformers#48371), so expert weights come out "
              "mis-scaled without an error; serve with vLLM / SGLang or read with fp4cal.load", "transformers-moe")
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
        if dtype.endswith("float32"):
            r.add("error", ("transformers",), "config.json dtype", "is float32 but transformers decompresses "
                  "fused experts to bfloat16: from_pretrained(ckpt) fails with a dtype mismatch (pass "
                  "dtype=torch.bfloat16, or re-export: fp4cal writes bfloat16 for MoE)", "transformers-dtype")
    return r.findings


def is_fatal(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def format_findings(findings: list[Finding], path: str | os.PathLike, engines: tuple[str, ...]) -> str:
    """A report: one line per finding, then a summary line per engine."""
    lines = [f"fp4cal check {path} ({', '.join(engines)})"]
    lines += ["  " + f.line() for f in findings]
    for e in engines:
        errs = sum(1 for f in findings if e in f.engines and f.severity == "error")
        warns = sum(1 for f in findings if e in f.engines and f.severity == "warning")
        verdict = "FAIL" if errs else "ok"
        lines.append(f"{e:<13} {verdict:<4}  {errs} error(s), {warns} warning(s)")
    return "\n".join(lines)


# The engines each format is written for: export refuses a checkpoint with an error for one of these.
TARGETS = {ct_format.NAME: ("vllm", "sglang"), mo_format.NAME: ("vllm", "sglang", "tensorrt-llm")}


class ExportCheckWarning(UserWarning):
    """An exported checkpoint that some engine (not one the format is written for) will refuse or mis-load."""


def check_export(directory: str | os.PathLike, format: str) -> list[Finding]:
    """The check export() runs on its staged directory before renaming it into place. Raises CheckpointError
    listing the errors for the engines ``format`` is written for (TARGETS; name-based heuristics excepted,
    since export knows the module types); warns (ExportCheckWarning) about the findings for other engines."""
    import warnings

    findings = check_checkpoint(directory)
    targets = TARGETS[format]
    fatal = [f for f in findings if f.severity == "error" and f.rule != "ignore-dense"
             and set(f.engines) & set(targets)]
    if fatal:
        raise CheckpointError(
            f"the exported {format} checkpoint would not load in {', '.join(targets)}; nothing was written:\n"
            + "\n".join("  " + f.line() for f in fatal)
        )
    by_design = ("trtllm-format", "transformers-modelopt")  # a format's engines are documented; no need to warn
    for f in findings:
        if f not in fatal and f.severity == "error" and f.rule not in by_design:
            warnings.warn(f"exported checkpoint: {f.line()}", ExportCheckWarning, stacklevel=3)
    return findings
