"""torch.compile(fullgraph=True) traces through kernels.linear in one graph, without a GPU.

Dynamo runs in a child process with the interpreter off (interpreted kernels cannot be traced) on fake
CUDA tensors: the launcher's validation, the ``triton_op`` registration and ``wrap_triton``'s fake
implementation of the autotuned kernel all run, the kernel never does. A graph break or a host sync in
the launch path fails ``fullgraph=True``. The GPU test in test_linear.py runs the compiled graph.
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
from kernels import linear

graphs = []

def capture(gm, example_inputs):
    graphs.append(gm)
    return gm.forward

def mlp(x, w1, b1, w2, b2):
    h = linear(x, w1, b1, activation="quick_gelu")
    return linear(h, w2, b2, residual=x)

with FakeTensorMode():
    x = torch.empty(2, 257, 64, device="cuda", dtype=torch.bfloat16)
    w1, w2 = torch.empty(256, 64, device="cuda", dtype=torch.bfloat16), torch.empty(64, 256, device="cuda", dtype=torch.bfloat16)
    b1, b2 = torch.empty(256, device="cuda", dtype=torch.float32), torch.empty(64, device="cuda", dtype=torch.bfloat16)
y = torch.compile(mlp, fullgraph=True, backend=capture)(x, w1, b1, w2, b2)
calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
print(json.dumps({"graphs": len(graphs), "calls": calls, "y": [list(y.shape), str(y.dtype)]}))
"""


def test_fullgraph_trace_on_fake_cuda_tensors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["graphs"] == 1
    assert [c for c in out["calls"] if "kernels" in c] == ["kernels.linear", "kernels.linear"]
    assert out["y"] == [[2, 257, 64], "torch.bfloat16"]
