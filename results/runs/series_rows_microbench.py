"""The dense series GEMM two ways (6 heads of 64x64, 118 tokens, 120 monomials, 2 threads):
"batch" (a permuted copy of the coefficients, then (N, T) @ (T, hm*s*s)) against "rows" (one
batched product over the coefficients' hm*s rows, reading them in place), forward; and the
coefficients' gradient from a batch-major (strided rows) or "rows" (contiguous) gradient.

    python results/runs/series_rows_microbench.py
"""

import statistics
import time

import torch

torch.set_num_threads(2)
N, T, HM, S = 118, 120, 6, 64
gen = torch.Generator().manual_seed(0)
weights = torch.randn(N, T, generator=gen)
coefficients = torch.randn(HM, S, T * S, generator=gen)  # the recursion's layout
grad_batch = torch.randn(N, HM, S, S, generator=gen)
grad_rows = grad_batch.permute(1, 2, 0, 3).contiguous()


def batch_forward() -> torch.Tensor:
    flat = torch.empty(T, HM, S, S)
    flat.copy_(coefficients.view(HM, S, T, S).permute(2, 0, 1, 3))
    return torch.mm(weights, flat.view(T, -1)).view(N, HM, S, S)


def rows_forward() -> torch.Tensor:
    rows = coefficients.view(HM * S, T, S)
    return torch.bmm(weights.expand(HM * S, N, T), rows).view(HM, S, N, S)


def batch_backward() -> torch.Tensor:
    rows = grad_batch.view(N, HM * S, S).transpose(0, 1)
    return torch.bmm(weights.mT.expand(HM * S, T, N), rows)


def rows_backward() -> torch.Tensor:
    return torch.bmm(weights.mT.expand(HM * S, T, N), grad_rows.view(HM * S, N, S))


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


same = torch.equal(batch_forward(), rows_forward().permute(2, 0, 1, 3))
same_grad = torch.equal(batch_backward(), rows_backward())
print(f"forward results equal: {same}; backward equal: {same_grad}")
for rep in range(3):
    forward = f"forward batch {median_ms(batch_forward):.2f} rows {median_ms(rows_forward):.2f}"
    backward = f"backward batch {median_ms(batch_backward):.2f} rows {median_ms(rows_backward):.2f}"
    print(f"{rep}: {forward} ms; {backward} ms")
