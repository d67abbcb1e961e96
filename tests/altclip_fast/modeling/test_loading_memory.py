"""Loading holds the model, not the model plus the file: an fp32 safetensors checkpoint loaded as bf16
(or fp32) peaks at most 1.5x the model it leaves resident (parameters plus the prepare step's derived
copies), plus a fixed allowance. Loading that holds the whole file while converting (as
``safetensors.torch.load_file`` then ``.to`` does) peaks past 2x and fails here.

Each load runs in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from altclip_fast.modeling.config import AltCLIPConfig
from altclip_fast.modeling.model import checkpoint_shapes

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")

# Big enough that the file (180 MB in fp32) dwarfs torch's own allocations during a load, small
# enough to write and load in a few seconds.
CONFIG = AltCLIPConfig(
    text_config=dict(
        vocab_size=50000, hidden_size=512, num_attention_heads=8, num_hidden_layers=3, intermediate_size=2048,
        project_dim=384, max_position_embeddings=130,
    ),
    vision_config=dict(
        hidden_size=512, num_attention_heads=8, num_hidden_layers=3, intermediate_size=2048, image_size=112,
        patch_size=14, projection_dim=384,
    ),
    projection_dim=384,
)
BOUND = 1.5
# What a load allocates whatever the model's size: the reader's 16 MB slice buffer, allocator slack.
# (The modules a first load imports, triton and sympy among them, ~200 MB, come before the
# measurement: the child loads a tiny checkpoint first.)
ALLOWANCE = 48 << 20
TINY = AltCLIPConfig(
    text_config=dict(vocab_size=100, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                     project_dim=16, max_position_embeddings=20),
    vision_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, image_size=28,
                       patch_size=14, projection_dim=16),
    projection_dim=16,
)

# The peak is VmHWM, the high-water mark of this process's own memory: ru_maxrss would carry over the
# peak of the process that forked it (pytest's, gigabytes after the full-size tests).
_CHILD = r"""
import json, sys
import torch
from altclip_fast.modeling.model import AltCLIPModel
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
AltCLIPModel.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
before = status("VmRSS")
model = AltCLIPModel.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3]))
peak = status("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(before=before, peak=peak, resident=params + model.derived_nbytes())))
"""


def _save_random_fp32(directory: Path, config: AltCLIPConfig) -> int:
    gen = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(shape, generator=gen) * 0.02 for key, shape in checkpoint_shapes(config).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    mid, tiny = tmp_path_factory.mktemp("midsize"), tmp_path_factory.mktemp("tiny")
    assert _save_random_fp32(mid, CONFIG) > 150e6, "too small for the bound to mean anything"
    _save_random_fp32(tiny, TINY)
    return mid, tiny


def _load_in_fresh_process(checkpoints: tuple[Path, Path], dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3]), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, checkpoints), dtype], capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loading_peak_is_at_most_1_5x_the_resident_model(checkpoints, dtype):
    r = _load_in_fresh_process(checkpoints, dtype)
    growth = r["peak"] - r["before"]
    mb = 1 << 20
    assert growth <= BOUND * r["resident"] + ALLOWANCE, (
        f"{dtype}: loading grew RSS by {growth / mb:.0f} MB for a resident model of {r['resident'] / mb:.0f} MB "
        f"(bound {BOUND}x + {ALLOWANCE / mb:.0f} MB)"
    )
