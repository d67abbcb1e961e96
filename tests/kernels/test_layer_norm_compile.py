"""torch.compile(fullgraph=True) traces through kernels.add_layer_norm in one graph, without a GPU.

Dynamo runs in a child process with the interpreter off (interpreted kernels cannot be traced) on fake
CUDA tensors: the launcher's validation, the ``triton_op`` registration and ``wrap_triton``'s fake
implementation all run, the kernel never does. A graph break or a host sync (``.item()``, ``.tolist()``)
in the launch path fails ``fullgraph=True``. The GPU test in test_layer_norm.py runs the compiled graph.
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
from kernels import add_layer_norm

graphs = []

def capture(gm, example_inputs):
    graphs.append(gm)
    return gm.forward

def layer(x, r, w, b, xb):
    y, s = add_layer_norm(x, w, b, residual=r, x_bias=xb, return_sum=True)
    return y * 2, s

with FakeTensorMode():
    x, r = (torch.empty(2, 7, 1000, device="cuda", dtype=torch.float16) for _ in range(2))
    w, b, xb = (torch.empty(1000, device="cuda", dtype=torch.float32) for _ in range(3))
y, s = torch.compile(layer, fullgraph=True, backend=capture)(x, r, w, b, xb)
calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
print(json.dumps({"graphs": len(graphs), "calls": calls, "y": [list(y.shape), str(y.dtype)],
                  "s": [list(s.shape), str(s.dtype)]}))
"""


def test_fullgraph_trace_on_fake_cuda_tensors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["graphs"] == 1
    assert [c for c in out["calls"] if "kernels" in c] == ["kernels.add_layer_norm"]
    assert out["y"] == [[2, 7, 1000], "torch.float16"]
    assert out["s"] == [[2, 7, 1000], "torch.float16"]
