"""Cost of scaled_dot_product_attention when the key length grows by one every call (as in decode),
per SDPA backend, vs. a fixed key length. Prints ms per call (host + GPU, synchronised)."""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = torch.device("cuda")
print(torch.__version__, torch.cuda.get_device_name(), "cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled())
q = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)


def run(backends, grow: bool, n: int = 40) -> float:
    times = []
    with sdpa_kernel(backends):
        for i in range(n):
            L = 200 + (i if grow else 0)
            k = torch.randn(1, 8, L, 128, device=dev, dtype=torch.bfloat16)
            mask = torch.ones(1, 1, 1, L, device=dev, dtype=torch.bool)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times = sorted(times[5:])
    return 1e3 * times[len(times) // 2]


for name, b in [("default (all)", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
                ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                ("math", [SDPBackend.MATH])]:
    for grow in (False, True):
        try:
            print(f"{name:14s} {'growing' if grow else 'fixed  '} key length: {run(b, grow):8.3f} ms/call")
        except RuntimeError as exc:
            print(f"{name:14s} unavailable: {str(exc).splitlines()[0][:100]}")
