"""Exactness sweep over timm models: each model (random init, small images) in its own process,
one OrthoGrad step in the API contract's order against the oracle (benchmarks/oracle.py),
one line per model. Diagnostic tool, not part of the timed suite or of CI (timm is no dependency).

    python -m benchmarks.timm_sweep --out sweep.txt [--dtype float64] [--models vit_tiny_patch16_224,...]

``--dtype float64`` runs the model and the oracle's per-sample loop in float64 (a mismatch there is
no rounding); the default float32 is what users run (the oracle loop in float32, tolerance 1e-3).

timm's wheel requires torchvision, and torchvision's wheels pull a CUDA torch over a CPU one.
``--stub-torchvision`` imports timm without it (its models import torchvision only for
FrozenBatchNorm2d and for data transforms and datasets the models here do not use): install timm
with ``pip install --no-deps timm``. Lines read ``name ok|MISMATCH|ERR|ORACLE|BUILD ...``: ERR is
the step's error (a refusal names the module and what to do), ORACLE the oracle's own failure
(timm's LeViT-style attention-bias caches in eval mode cannot backward twice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name, image size, create_model overrides (small depths where the model takes them)
MODELS = [
    ("vit_tiny_patch16_224", 32, {"img_size": 32, "patch_size": 8}),
    ("deit_tiny_distilled_patch16_224", 32, {"img_size": 32, "patch_size": 8}),
    ("cait_xxs24_224", 32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("swin_tiny_patch4_window7_224", 56, {"img_size": 56, "depths": [1, 1, 1, 1], "window_size": 7}),
    ("swinv2_tiny_window8_256", 64, {"img_size": 64, "depths": [1, 1, 1, 1], "window_size": 4}),
    ("convnext_atto", 64, {}),
    ("convnextv2_atto", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("mobilenetv3_small_050", 64, {}),
    ("resnet18", 64, {}),
    ("regnetx_002", 64, {}),
    ("regnety_002", 64, {}),
    ("mixer_s32_224", 64, {"img_size": 64}),
    ("resmlp_12_224", 224, {}),
    ("gmlp_ti16_224", 224, {}),
    ("poolformer_s12", 64, {}),
    ("xcit_nano_12_p16_224", 64, {"img_size": 64, "depth": 2}),
    ("pit_ti_224", 64, {"img_size": 64}),
    ("convit_tiny", 64, {"img_size": 64, "depth": 2}),
    ("coat_lite_tiny", 224, {}),
    ("crossvit_tiny_240", 240, {}),
    ("eva02_tiny_patch14_224", 56, {"img_size": 56, "depth": 2}),
    ("beit_base_patch16_224", 32, {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 2}),
    ("coatnet_nano_rw_224", 64, {"img_size": 64}),
    ("fastvit_t8", 64, {}),
    ("edgenext_xx_small", 64, {}),
    ("mobilevitv2_050", 64, {}),
    ("mobilevit_xxs", 256, {}),
    ("nf_resnet26", 64, {}),
    ("resnetv2_50x1_bit", 64, {}),
    ("dla34", 64, {}),
    ("ghostnet_100", 64, {}),
    ("repvgg_a0", 64, {}),
    ("rexnet_100", 64, {}),
    ("lcnet_050", 64, {}),
    ("densenet121", 64, {}),
    ("inception_v3", 128, {}),
    ("xception41", 96, {}),
    ("dpn68", 64, {}),
    ("sequencer2d_s", 64, {"img_size": 64, "layers": [1, 1, 1, 1]}),
    ("visformer_tiny", 64, {"img_size": 64}),
    ("hiera_tiny_224", 64, {"img_size": [64, 64]}),
    ("davit_tiny", 64, {"depths": [1, 1, 1, 1]}),
    ("focalnet_tiny_srf", 64, {}),
    ("hgnet_tiny", 64, {}),
    ("ese_vovnet19b_dw", 64, {}),
    ("cspresnet50", 64, {}),
    ("resnest14d", 64, {}),
    ("skresnet18", 64, {}),
    ("halonet26t", 256, {}),
    ("botnet26t_256", 64, {"img_size": 64}),
    ("lambda_resnet26t", 64, {}),
    ("volo_d1_224", 64, {"img_size": 64}),
    ("mvitv2_tiny", 64, {"img_size": 64}),
    ("gcvit_xxtiny", 64, {"img_size": 64}),
    ("pvt_v2_b0", 64, {}),
    ("efficientvit_b0", 64, {}),
    ("starnet_s1", 64, {}),
    ("inception_next_tiny", 64, {}),
    ("mambaout_femto", 64, {}),
    ("nest_tiny", 64, {"img_size": 64}),
    ("tnt_s_patch16_224", 64, {"img_size": 64, "depth": 2}),
    ("twins_svt_small", 64, {"img_size": 64, "depths": [1, 1, 1, 1]}),
    ("vit_small_patch16_rope_224", 64, {"img_size": 64, "depth": 2}),
    ("vit_base_patch16_siglip_224", 64, {"img_size": 64, "depth": 1, "embed_dim": 64, "num_heads": 2}),
    ("vit_medium_patch16_reg4_gap_256", 64, {"img_size": 64, "depth": 2}),
    ("flexivit_small", 64, {"img_size": 64, "depth": 2}),
    ("maxvit_nano_rw_256", 64, {"img_size": 64}),
    ("levit_128s", 224, {}),
]


def stub_torchvision() -> None:
    """A module finder that serves ``torchvision`` and its submodules as stand-ins whose attributes
    are inert classes, with a working ``ops.misc.FrozenBatchNorm2d`` (eval-mode batch norm)."""
    import importlib.abc
    import importlib.machinery
    import types

    import torch

    class Inert:
        def __init__(self, *a, **k):
            pass

    class AnyAttr(type):  # enum-like class attributes (InterpolationMode.NEAREST): their names
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return name

    class FrozenBatchNorm2d(torch.nn.Module):
        def __init__(self, num_features, eps=1e-5):
            super().__init__()
            for n, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(n, torch.full((num_features,), v))
            self.eps = eps

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            v = FrozenBatchNorm2d if name == "FrozenBatchNorm2d" else AnyAttr(name, (Inert,), {})
            setattr(self, name, v)
            return v

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Stub(spec.name)
            m.__path__, m.__version__ = [], "0+stub"
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def check_one(name: str, size: int, overrides: dict, dtype: str) -> str:
    """One model's line (run in a child process: a model's failure or leak stays there)."""
    import torch

    import timm
    from benchmarks import oracle as O
    from orthograd_fast import OrthoGrad

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    try:
        m = timm.create_model(name, pretrained=False, num_classes=3, **overrides).eval().to(dt)
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        return f"{name} BUILD {type(e).__name__} {str(e)[:200]}"
    g = torch.Generator().manual_seed(0)
    wide = (torch.float32, torch.float64)
    ce = lambda o, y: torch.nn.functional.cross_entropy(o if o.dtype in wide else o.float(), y, reduction="none")  # noqa: E731
    xr, xu = (torch.randn(b, 3, size, size, generator=g).to(dt) for b in (4, 2))
    yr, yu = torch.randint(0, 3, (4,), generator=g), torch.randint(0, 3, (2,), generator=g)
    t0 = time.perf_counter()
    try:
        # the engine's default rank cutoff for the dtype's factors (README, rtol): float64 keeps
        # singular values the float32 default of the oracle drops (ghostnet's head bias: 3e-7)
        orc = O.oracle_direction(m, ce, (xr, yr), (xu, yu), loop_dtype=dt, rtol=1e-8 if dt == torch.float64 else None)
    except Exception as e:  # noqa: BLE001
        return f"{name} ORACLE {type(e).__name__} {str(e)[:160]}"
    og = OrthoGrad(m)
    try:
        m.zero_grad(set_to_none=True)
        with og.retain():
            ce(m(xr), yr).mean().backward()
        ce(m(xu), yu).mean().backward()
        og.project_()
    except Exception as e:  # noqa: BLE001
        return f"{name} ERR {type(e).__name__} {str(e)[:400]}"
    r = O.compare(O.grads_as_dict(m), orc)
    fb = og.stats.get("fallback", [])
    params = sum(p.numel() for p in m.parameters())
    return (f"{name} {'ok' if r.ok else 'MISMATCH'} params={params} {r.message}"
            + (f" FALLBACK {fb}" if fb else "") + f" ({time.perf_counter() - t0:.0f} s)").replace("\n", " ")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--models", default=None, help="comma-separated subset of the list")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--stub-torchvision", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: name,size,json overrides
    a = ap.parse_args(argv)
    if a.stub_torchvision:
        stub_torchvision()
    if a.one is not None:
        name, size, overrides = json.loads(a.one)
        print("SWEEP " + check_one(name, size, overrides, a.dtype), flush=True)
        return
    chosen = set(a.models.split(",")) if a.models else None
    cases = [c for c in MODELS if chosen is None or c[0] in chosen]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def run(case):
        cmd = [sys.executable, "-m", "benchmarks.timm_sweep", "--out", a.out, "--dtype", a.dtype, "--one", json.dumps(case)]
        if a.stub_torchvision:
            cmd.append("--stub-torchvision")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"{case[0]} TIMEOUT ({a.timeout} s)"
        lines = [ln[6:] for ln in r.stdout.splitlines() if ln.startswith("SWEEP ")]
        return lines[-1] if lines else f"{case[0]} CRASH {r.stderr[-300:]!r}"

    with ThreadPoolExecutor(a.jobs) as ex, open(a.out, "w") as f:
        for line in ex.map(run, cases):
            print(line, flush=True)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
