"""torch.compile(fullgraph=True) traces through every kernel op in one graph each, without a GPU.

Dynamo runs in a child process with the interpreter off (interpreted kernels cannot be traced) on fake
CUDA tensors: the launchers' validation, the ``triton_op`` registrations and ``wrap_triton``'s fake
implementations (of the autotuned kernels too) all run; the kernels never do. A graph break or a host
sync (``.item()``, ``.tolist()``) in a launch path fails ``fullgraph=True``. The GPU tests in the
per-kernel files run the compiled graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from altclip_fast.kernels import add_layer_norm, attention, linear

def layer_norm_block(x, r, w, b, xb):
    y, s = add_layer_norm(x, w, b, residual=r, x_bias=xb, return_sum=True)
    return y * 2, s

def mlp(x, w1, b1, w2, b2):
    h = linear(x, w1, b1, activation="quick_gelu")
    return linear(h, w2, b2, residual=x)

def packed_attention(qkv, cu):
    q, k, v = qkv.unbind(1)
    return attention(q, k, v, cu_seqlens=cu, max_seqlen=77)

def empty(*shape, dtype):
    return torch.empty(*shape, device="cuda", dtype=dtype)

with FakeTensorMode():
    cases = {
        "layer_norm": (layer_norm_block, (empty(2, 7, 1000, dtype=torch.float16), empty(2, 7, 1000, dtype=torch.float16),
                                          *(empty(1000, dtype=torch.float32) for _ in range(3)))),
        "linear": (mlp, (empty(2, 257, 64, dtype=torch.bfloat16), empty(256, 64, dtype=torch.bfloat16),
                         empty(256, dtype=torch.float32), empty(64, 256, dtype=torch.bfloat16),
                         empty(64, dtype=torch.bfloat16))),
        "attention": (packed_attention, (empty(100, 3, 4, 64, dtype=torch.bfloat16), empty(3, dtype=torch.int32))),
    }
    report = {}
    for name, (fn, args) in cases.items():
        graphs = []
        def capture(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        report[name] = {
            "graphs": len(graphs),
            "calls": [str(n.target) for g in graphs for n in g.graph.nodes
                      if n.op == "call_function" and "altclip_fast" in str(n.target)],
            "outs": [[list(o.shape), str(o.dtype)] for o in outs],
        }
print(json.dumps(report))
"""


def test_fullgraph_trace_on_fake_cuda_tensors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["layer_norm"] == {
        "graphs": 1, "calls": ["altclip_fast.add_layer_norm"],
        "outs": [[[2, 7, 1000], "torch.float16"], [[2, 7, 1000], "torch.float16"]],
    }
    assert report["linear"] == {
        "graphs": 1, "calls": ["altclip_fast.linear", "altclip_fast.linear"], "outs": [[[2, 257, 64], "torch.bfloat16"]],
    }
    assert report["attention"] == {
        "graphs": 1, "calls": ["altclip_fast.attention"], "outs": [[[100, 4, 64], "torch.bfloat16"]],
    }
